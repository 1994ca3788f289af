//! Evaluation of a model's probabilities against labels: ranking (ROC AUC, PR AUC),
//! probability quality (log loss, calibration), and the trade-off at the thresholds
//! triggers use.

use serde::Serialize;

/// Every figure of an evaluation.
#[derive(Clone, Debug, Serialize)]
pub struct Evaluation {
    pub rows: usize,
    pub positive_rate: f64,
    pub auc: f64,
    pub pr_auc: f64,
    pub log_loss: f64,
    /// Ten equal-width bins of predicted probability.
    pub calibration: Vec<CalibrationBin>,
    /// Precision and recall at each trigger threshold.
    pub at_thresholds: Vec<AtThreshold>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CalibrationBin {
    pub from: f64,
    pub to: f64,
    pub count: usize,
    pub mean_predicted: f64,
    pub observed_rate: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct AtThreshold {
    pub threshold: f64,
    pub precision: f64,
    pub recall: f64,
    /// Share of rows at or above the threshold: how often a trigger would fire.
    pub flagged: f64,
}

/// The thresholds reported by default (a trigger on purchase at 0.75, for example).
pub const THRESHOLDS: &[f64] = &[0.25, 0.5, 0.75, 0.9];

pub fn evaluate(p: &[f64], y: &[bool], thresholds: &[f64]) -> Evaluation {
    let n = p.len().max(1) as f64;
    let positives = y.iter().filter(|&&l| l).count();
    let log_loss = p
        .iter()
        .zip(y)
        .map(|(&p, &y)| {
            let p = p.clamp(1e-15, 1.0 - 1e-15);
            if y {
                -p.ln()
            } else {
                -(1.0 - p).ln()
            }
        })
        .sum::<f64>()
        / n;
    let calibration = (0..10)
        .map(|b| {
            let (from, to) = (b as f64 / 10.0, (b + 1) as f64 / 10.0);
            let inside: Vec<(f64, bool)> = p
                .iter()
                .zip(y)
                .filter(|(&p, _)| p >= from && (p < to || (b == 9 && p <= to)))
                .map(|(&p, &y)| (p, y))
                .collect();
            let count = inside.len();
            let mean = |f: &dyn Fn(&(f64, bool)) -> f64| {
                if count == 0 {
                    f64::NAN
                } else {
                    inside.iter().map(f).sum::<f64>() / count as f64
                }
            };
            CalibrationBin {
                from,
                to,
                count,
                mean_predicted: mean(&|x| x.0),
                observed_rate: mean(&|x| f64::from(u8::from(x.1))),
            }
        })
        .collect();
    let at_thresholds = thresholds
        .iter()
        .map(|&threshold| {
            let flagged = p.iter().filter(|&&p| p >= threshold).count();
            let hits = p
                .iter()
                .zip(y)
                .filter(|(&p, &y)| p >= threshold && y)
                .count();
            AtThreshold {
                threshold,
                precision: if flagged == 0 {
                    f64::NAN
                } else {
                    hits as f64 / flagged as f64
                },
                recall: if positives == 0 {
                    f64::NAN
                } else {
                    hits as f64 / positives as f64
                },
                flagged: flagged as f64 / n,
            }
        })
        .collect();
    Evaluation {
        rows: p.len(),
        positive_rate: positives as f64 / n,
        auc: auc(p, y),
        pr_auc: average_precision(p, y),
        log_loss,
        calibration,
        at_thresholds,
    }
}

/// The area under the ROC curve: the chance that a random positive scores above a random
/// negative, ties counting half.
pub fn auc(scores: &[f64], labels: &[bool]) -> f64 {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let positives = labels.iter().filter(|&&l| l).count() as f64;
    let negatives = labels.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return f64::NAN;
    }
    // Sum of positive ranks, with tied scores sharing their average rank.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let average_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += order[i..=j].iter().filter(|&&o| labels[o]).count() as f64 * average_rank;
        i = j + 1;
    }
    (rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives)
}

/// The area under the precision-recall curve as average precision: the mean of the
/// precision at each positive, ranking by score (ties as one step).
pub fn average_precision(scores: &[f64], labels: &[bool]) -> f64 {
    let positives = labels.iter().filter(|&&l| l).count();
    if positives == 0 {
        return f64::NAN;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut seen, mut hits, mut sum) = (0usize, 0usize, 0.0);
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let new_hits = order[i..=j].iter().filter(|&&o| labels[o]).count();
        seen += j - i + 1;
        hits += new_hits;
        sum += new_hits as f64 * hits as f64 / seen as f64;
        i = j + 1;
    }
    sum / positives as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_match_hand_computed_values() {
        let labels = [false, false, true, true];
        assert_eq!(auc(&[0.1, 0.2, 0.3, 0.4], &labels), 1.0);
        assert_eq!(auc(&[0.4, 0.3, 0.2, 0.1], &labels), 0.0);
        assert_eq!(auc(&[0.5, 0.5, 0.5, 0.5], &labels), 0.5);
        assert_eq!(auc(&[0.1, 0.35, 0.3, 0.4], &labels), 0.75);
        // Ranked 0.4 (hit), 0.35 (miss), 0.3 (hit): precision 1 and 2/3.
        assert!(
            (average_precision(&[0.1, 0.35, 0.3, 0.4], &labels) - (1.0 + 2.0 / 3.0) / 2.0).abs()
                < 1e-12
        );
        let e = evaluate(&[0.1, 0.35, 0.3, 0.8], &labels, &[0.5]);
        assert_eq!(
            (e.at_thresholds[0].precision, e.at_thresholds[0].recall),
            (1.0, 0.5)
        );
        assert!(
            (e.log_loss - (-(0.9f64.ln() + 0.65f64.ln() + 0.3f64.ln() + 0.8f64.ln()) / 4.0)).abs()
                < 1e-12
        );
        assert_eq!(e.calibration.iter().map(|b| b.count).sum::<usize>(), 4);
    }
}
