//! `nudge-train`: simulate a population, train the default purchase and churn models, and
//! publish them with manifests.

use std::path::PathBuf;

use clap::Parser;

use nudge::time::{Time, DAY_MS};
use nudge_training::dataset::{self, Target};
use nudge_training::simulate::{self, SimConfig};
use nudge_training::train::{self, TrainOptions};

/// Train Nudge's default models on simulated clickstream histories.
#[derive(Parser)]
#[command(name = "nudge-train", version)]
struct Cli {
    /// Where to publish models and manifests.
    #[arg(long, default_value = "models")]
    out: PathBuf,
    /// People to simulate.
    #[arg(long, default_value_t = 4000)]
    people: usize,
    /// Days of history to simulate.
    #[arg(long, default_value_t = 120)]
    days: i64,
    /// Seed for the simulator and LightGBM.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// LightGBM boosting rounds.
    #[arg(long, default_value_t = 200)]
    rounds: u32,
    /// The version written into the manifests.
    #[arg(long, default_value = "sim-1")]
    model_version: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // A fixed start keeps regeneration byte-for-byte reproducible: 2026-01-05, a Monday.
    let start = Time(1_767_571_200_000);
    let config = SimConfig {
        people: cli.people,
        days: cli.days,
        start,
        seed: cli.seed,
    };
    let histories = simulate::simulate(&config);
    let events: usize = histories.iter().map(|h| h.events.len()).sum();
    println!(
        "simulated {} people, {events} events over {} days",
        cli.people, cli.days
    );

    let end = start.plus_ms(cli.days * DAY_MS);
    let examples = dataset::examples(&histories, end);
    let options = TrainOptions {
        rounds: cli.rounds,
        seed: cli.seed,
        ..TrainOptions::default()
    };
    // One person in five is held out, by index, so train and holdout never share a person.
    let is_holdout = |person: usize| person % 5 == 0;
    for target in Target::ALL {
        let trained = train::train_target(&examples, target, is_holdout, &options)?;
        let manifest = train::publish(&cli.out, &trained, &cli.model_version)?;
        println!(
            "{:<8} train rows {:>7}  holdout rows {:>7}  positive rate {:.3}  holdout AUC {:.4}  -> {}",
            manifest.name,
            trained.train_rows,
            trained.holdout_rows,
            trained.positive_rate,
            trained.holdout_auc,
            cli.out.join(&manifest.file).display()
        );
    }
    Ok(())
}
