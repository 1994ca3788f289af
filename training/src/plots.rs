//! Report plots as SVG (ROC curve, calibration, feature importance), drawn with plotters'
//! SVG backend, which needs no font files: text is left to the viewer.

use std::path::Path;

use plotters::prelude::*;

use crate::evaluate::Evaluation;

/// Points of the ROC curve: (false positive rate, true positive rate), thresholds from high
/// to low.
pub fn roc_points(scores: &[f64], labels: &[bool]) -> Vec<(f64, f64)> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let positives = labels.iter().filter(|&&l| l).count().max(1) as f64;
    let negatives = (labels.len() as f64 - positives).max(1.0);
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut points = vec![(0.0, 0.0)];
    for (k, &i) in order.iter().enumerate() {
        if labels[i] {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        let last_of_tie = order.get(k + 1).is_none_or(|&j| scores[j] != scores[i]);
        if last_of_tie {
            points.push((fp / negatives, tp / positives));
        }
    }
    points
}

type Result = std::result::Result<(), Box<dyn std::error::Error>>;

/// A curve on the unit square with the diagonal for reference (ROC, calibration).
fn unit_square(
    path: &Path,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    points: &[(f64, f64)],
    color: RGBColor,
    markers: bool,
) -> Result {
    let root = SVGBackend::new(path, (560, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(44)
        .build_cartesian_2d(0.0..1.0, 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()?;
    chart.draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], &BLACK.mix(0.3)))?;
    chart.draw_series(LineSeries::new(points.iter().copied(), &color))?;
    if markers {
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    root.present()?;
    Ok(())
}

pub fn roc(path: &Path, title: &str, points: &[(f64, f64)]) -> Result {
    let axes = ("false positive rate", "true positive rate");
    unit_square(path, title, axes, points, BLUE, false)
}

pub fn calibration(path: &Path, title: &str, e: &Evaluation) -> Result {
    let points: Vec<(f64, f64)> = e
        .calibration
        .iter()
        .filter(|b| b.count > 0)
        .map(|b| (b.mean_predicted, b.observed_rate))
        .collect();
    unit_square(
        path,
        title,
        ("mean predicted", "observed rate"),
        &points,
        RED,
        true,
    )
}

pub fn importance(path: &Path, title: &str, importance: &[(String, f64)]) -> Result {
    let top: Vec<&(String, f64)> = importance.iter().take(12).collect();
    let total: f64 = importance
        .iter()
        .map(|(_, g)| g)
        .sum::<f64>()
        .max(f64::MIN_POSITIVE);
    let max = top
        .first()
        .map_or(1.0, |(_, g)| g / total * 100.0)
        .max(1e-9);
    let root = SVGBackend::new(path, (720, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(200)
        .build_cartesian_2d(0.0..max * 1.05, (0..top.len()).into_segmented())?;
    chart
        .configure_mesh()
        .x_desc("% of total gain")
        .y_labels(top.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => top.get(*i).map_or(String::new(), |(n, _)| n.clone()),
            _ => String::new(),
        })
        .draw()?;
    chart.draw_series(top.iter().enumerate().map(|(i, (_, g))| {
        Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (g / total * 100.0, SegmentValue::Exact(i + 1)),
            ],
            BLUE.mix(0.6).filled(),
        )
    }))?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roc_points_run_from_corner_to_corner() {
        let points = roc_points(&[0.9, 0.8, 0.3, 0.1], &[true, false, true, false]);
        assert_eq!(
            points,
            [(0.0, 0.0), (0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (1.0, 1.0)]
        );
    }
}
