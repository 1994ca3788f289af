//! Fitting behavioral segments: k-means (linfa) over people's behavioral metrics as of the
//! end of history, written as a segments file the server assigns people with.

use std::collections::BTreeMap;

use anyhow::Context as _;
use linfa::prelude::*;
use linfa_clustering::KMeans;
use ndarray15::Array2;
use rand_xoshiro::rand_core::SeedableRng;
use rand_xoshiro::Xoshiro256Plus;

use nudge::event::{Event, PersonKey};
use nudge::features::{self, FeatureRow, FEATURES};
use nudge::profile::Profile;
use nudge::segments::{Segment, Segments, METRICS};
use nudge::time::Time;

use crate::replay::People;

/// Every person's features as of `end` (default: the latest event).
pub fn people(
    events: impl Iterator<Item = anyhow::Result<Event>>,
    end: Option<Time>,
) -> anyhow::Result<Vec<FeatureRow>> {
    // Identities stitched as the server stitches them: one row per person.
    let mut people: People<Profile> = People::default();
    let mut latest = Time(i64::MIN);
    for event in events {
        let event = event?;
        latest = latest.max(event.time);
        let (_, profile) = people.route(&event, Profile::default, |user, visitor| {
            if let Some(visitor) = visitor {
                user.merge(visitor);
            }
        });
        profile.apply(&event);
    }
    let end = end.unwrap_or(latest);
    // Ordered, so that the rows (and k-means' start) do not depend on hashing.
    let profiles: BTreeMap<PersonKey, Profile> = people.into_states().collect();
    Ok(profiles
        .values()
        .map(|p| features::extract(p, end))
        .collect())
}

/// Fits `k` segments with a fixed seed.
pub fn fit(rows: &[FeatureRow], k: usize, seed: u64, version: &str) -> anyhow::Result<Segments> {
    anyhow::ensure!(
        rows.len() >= k,
        "{} people cannot make {k} segments",
        rows.len()
    );
    let n = METRICS.len();
    let raw: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| METRICS.iter().map(|&m| r.get(m)).collect())
        .collect();
    // ln(1 + x), then standardize; missing values become the mean.
    let logged = |v: f64| {
        if v.is_nan() {
            f64::NAN
        } else {
            v.max(0.0).ln_1p()
        }
    };
    let mut mean = vec![0.0; n];
    let mut std = vec![0.0; n];
    for j in 0..n {
        let col: Vec<f64> = raw
            .iter()
            .map(|r| logged(r[j]))
            .filter(|v| !v.is_nan())
            .collect();
        let m = col.iter().sum::<f64>() / col.len().max(1) as f64;
        let var = col.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / col.len().max(1) as f64;
        mean[j] = m;
        std[j] = var.sqrt().max(1e-9);
    }
    let mut scaled = Segments {
        version: version.to_owned(),
        features: vec![],
        mean,
        std,
        segments: vec![],
    };
    let mut matrix = Array2::<f64>::zeros((rows.len(), n));
    for (i, r) in raw.iter().enumerate() {
        for (j, v) in scaled
            .coordinates(r.iter().copied())
            .into_iter()
            .enumerate()
        {
            matrix[[i, j]] = v;
        }
    }
    let dataset = DatasetBase::from(matrix);
    let model = KMeans::params_with_rng(k, Xoshiro256Plus::seed_from_u64(seed))
        .max_n_iterations(300)
        .tolerance(1e-6)
        .fit(&dataset)
        .context("k-means")?;
    let assigned = model.predict(&dataset);
    scaled.features = METRICS
        .iter()
        .map(|&m| FEATURES[m as usize].name.to_owned())
        .collect();
    for c in 0..k {
        let members: Vec<&Vec<f64>> = raw
            .iter()
            .zip(assigned.iter())
            .filter(|(_, &a)| a == c)
            .map(|(r, _)| r)
            .collect();
        // The readable centroid: the members' mean in the metrics' own units.
        let centroid: Vec<f64> = (0..n)
            .map(|j| {
                let vals: Vec<f64> = members
                    .iter()
                    .map(|r| r[j])
                    .filter(|v| !v.is_nan())
                    .collect();
                if vals.is_empty() {
                    f64::NAN
                } else {
                    vals.iter().sum::<f64>() / vals.len() as f64
                }
            })
            .collect();
        let z = model.centroids().row(c).to_vec();
        scaled.segments.push(Segment {
            id: c as u32,
            name: name(&scaled.features, &z),
            size: members.len() as u64,
            centroid,
        });
    }
    Ok(scaled)
}

/// A name from the two metrics that set the segment apart most: "high purchases_90d, low
/// days_since_last_visit".
fn name(features: &[String], z: &[f64]) -> String {
    let mut order: Vec<usize> = (0..z.len()).collect();
    order.sort_by(|&a, &b| z[b].abs().total_cmp(&z[a].abs()));
    order
        .iter()
        .take(2)
        .map(|&j| {
            format!(
                "{} {}",
                if z[j] >= 0.0 { "high" } else { "low" },
                features[j]
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}
