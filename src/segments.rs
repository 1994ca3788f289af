//! Behavioral segments: the k-means segments a data team publishes (`segments.toml` in the
//! models directory, made by `nudge-train segments`), and the rule-based segments marketers
//! use. Both are computed from the same FeatureSpec row the models see.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::features::{Feature, FeatureRow, FeatureSpec};

/// The file name of the published segments in the models directory.
pub const SEGMENTS_FILE: &str = "segments.toml";

/// The metrics k-means clusters people by.
pub const METRICS: &[Feature] = &[
    Feature::Sessions30d,
    Feature::PageViews30d,
    Feature::CartAdds30d,
    Feature::Purchases90d,
    Feature::Revenue90d,
    Feature::DaysSinceLastVisit,
    Feature::VisitTrend,
    Feature::EmailOpens30d,
];

/// Published k-means segments. Metrics are compared after `ln(1 + x)` and standardizing
/// with the stored mean and standard deviation; a missing metric counts as the mean.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Segments {
    pub version: String,
    /// FeatureSpec names of the metrics, in column order.
    pub features: Vec<String>,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    pub segments: Vec<Segment>,
}

/// One segment, with its centroid in the metrics' own units (readable).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    pub id: u32,
    pub name: String,
    /// People in the segment when it was fitted.
    pub size: u64,
    pub centroid: Vec<f64>,
}

impl Segments {
    /// The transformed, standardized coordinates of a row's metrics.
    pub fn coordinates(&self, values: impl Iterator<Item = f64>) -> Vec<f64> {
        values
            .zip(self.mean.iter().zip(&self.std))
            .map(|(v, (m, s))| {
                if v.is_nan() {
                    0.0
                } else {
                    (v.max(0.0).ln_1p() - m) / s.max(1e-9)
                }
            })
            .collect()
    }

    /// The nearest segment to a person's features.
    pub fn assign(&self, row: &FeatureRow) -> Option<&Segment> {
        let spec = FeatureSpec::current();
        let point = self.coordinates(
            self.features
                .iter()
                .map(|n| spec.index_of(n).map_or(f64::NAN, |i| row.0[i])),
        );
        self.segments.iter().min_by(|a, b| {
            let d = |s: &Segment| {
                self.coordinates(s.centroid.iter().copied())
                    .iter()
                    .zip(&point)
                    .map(|(c, p)| (c - p) * (c - p))
                    .sum::<f64>()
            };
            d(a).total_cmp(&d(b))
        })
    }

    /// Reads and checks a segments file.
    pub fn load(path: &Path) -> Result<Segments, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let s: Segments = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let n = s.features.len();
        let spec = FeatureSpec::current();
        if let Some(unknown) = s.features.iter().find(|f| spec.index_of(f).is_none()) {
            return Err(format!(
                "{}: {unknown:?} is not a FeatureSpec feature",
                path.display()
            ));
        }
        if s.mean.len() != n || s.std.len() != n || s.segments.iter().any(|g| g.centroid.len() != n)
        {
            return Err(format!(
                "{}: every vector must have {n} values",
                path.display()
            ));
        }
        if s.segments.is_empty() {
            return Err(format!("{}: no segments", path.display()));
        }
        Ok(s)
    }
}

/// The rule-based segments a person is in, by rules marketers know:
/// - `new_visitor`: first seen less than 7 days ago;
/// - `engaged_shopper`: at least 2 purchases in 90 days and 4 sessions in 30;
/// - `at_risk`: a past buyer whose visits halved week on week or who has not visited for 14
///   days;
/// - `browser`: none of the above.
pub fn rule_segments(row: &FeatureRow) -> Vec<&'static str> {
    let f = |feature: Feature| row.get(feature);
    let mut out = Vec::new();
    if f(Feature::DaysSinceFirstSeen) < 7.0 {
        out.push("new_visitor");
    }
    if f(Feature::Purchases90d) >= 2.0 && f(Feature::Sessions30d) >= 4.0 {
        out.push("engaged_shopper");
    }
    if f(Feature::LifetimePurchases) >= 1.0
        && (f(Feature::VisitTrend) <= 0.5 || f(Feature::DaysSinceLastVisit) > 14.0)
    {
        out.push("at_risk");
    }
    if out.is_empty() {
        out.push("browser");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments() -> Segments {
        Segments {
            version: "t".into(),
            features: vec!["sessions_30d".into(), "purchases_90d".into()],
            mean: vec![1.0, 0.5],
            std: vec![1.0, 0.5],
            segments: vec![
                Segment {
                    id: 0,
                    name: "casual".into(),
                    size: 10,
                    centroid: vec![1.0, 0.0],
                },
                Segment {
                    id: 1,
                    name: "loyal".into(),
                    size: 5,
                    centroid: vec![20.0, 6.0],
                },
            ],
        }
    }

    #[test]
    fn people_go_to_the_nearest_segment_and_rules_apply() {
        let mut row = FeatureRow::missing();
        row.0[Feature::Sessions30d as usize] = 15.0;
        row.0[Feature::Purchases90d as usize] = 4.0;
        assert_eq!(segments().assign(&row).unwrap().name, "loyal");
        row.0[Feature::Sessions30d as usize] = 0.0;
        row.0[Feature::Purchases90d as usize] = 0.0;
        assert_eq!(segments().assign(&row).unwrap().name, "casual");

        let mut row = FeatureRow::missing();
        row.0[Feature::DaysSinceFirstSeen as usize] = 100.0;
        row.0[Feature::LifetimePurchases as usize] = 3.0;
        row.0[Feature::DaysSinceLastVisit as usize] = 20.0;
        assert_eq!(rule_segments(&row), ["at_risk"]);
        row.0[Feature::DaysSinceFirstSeen as usize] = 2.0;
        row.0[Feature::LifetimePurchases as usize] = 0.0;
        assert_eq!(rule_segments(&row), ["new_visitor"]);
    }
}
