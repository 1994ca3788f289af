//! `nudge-train`: simulate histories, train and publish models, export the point-in-time
//! table for Python, evaluate served models on it.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use nudge::features::FeatureSpec;
use nudge::model::Model;
use nudge::time::{Time, DAY_MS};
use nudge_training::dataset::{self, Builder, Example, Split, Target};
use nudge_training::evaluate::{evaluate, THRESHOLDS};
use nudge_training::input;
use nudge_training::simulate::{self, SimConfig};
use nudge_training::train::{self, Candidate, TrainOptions};

/// Train Nudge's models from labeled history.
#[derive(Parser)]
#[command(name = "nudge-train", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write simulated clickstream histories as JSON Lines (the Track shape).
    Simulate {
        #[command(flatten)]
        sim: SimArgs,
        #[arg(long)]
        out: PathBuf,
    },
    /// Train from events (and derived or given labels), compare with the published model on
    /// the same test set, write a report, and publish if not worse.
    Train {
        /// Events, .jsonl or .csv; each person's events in time order.
        #[arg(long)]
        events: PathBuf,
        #[command(flatten)]
        target: TargetArgs,
        /// Where models are published.
        #[arg(long, default_value = "models")]
        out: PathBuf,
        /// The version written into the manifest.
        #[arg(long)]
        model_version: String,
        /// Publish even if the published model does better on the test set.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        lightgbm: LightgbmArgs,
    },
    /// Write the point-in-time table (FeatureSpec columns, label, split, time) as CSV, for
    /// training in Python.
    Export {
        #[arg(long)]
        events: PathBuf,
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long)]
        out: PathBuf,
    },
    /// Score an exported table's test rows with a served model and print its AUC.
    Evaluate {
        #[arg(long)]
        table: PathBuf,
        /// A model's manifest.
        #[arg(long)]
        manifest: PathBuf,
    },
    /// Fit k behavioral segments (k-means over people's metrics as of the end of history)
    /// and write the segments file the server assigns people with.
    Segments {
        #[arg(long)]
        events: PathBuf,
        #[arg(long, default_value_t = 5)]
        k: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, default_value = "1")]
        segments_version: String,
        /// The file to write, normally models/segments.toml.
        #[arg(long)]
        out: PathBuf,
    },
    /// Regenerate the shipped default models: simulate with a fixed seed, train, publish.
    Defaults {
        #[arg(long, default_value = "models")]
        out: PathBuf,
        #[command(flatten)]
        sim: SimArgs,
        #[arg(long, default_value = "sim-3")]
        model_version: String,
    },
}

/// What to simulate: a population over some days, from a seed.
#[derive(clap::Args)]
struct SimArgs {
    #[arg(long, default_value_t = 4000)]
    people: usize,
    #[arg(long, default_value_t = 120)]
    days: i64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

impl SimArgs {
    fn config(&self) -> SimConfig {
        // A fixed start keeps regeneration byte-for-byte reproducible: 2026-01-05, a Monday.
        SimConfig {
            people: self.people,
            days: self.days,
            start: Time(1_767_571_200_000),
            seed: self.seed,
        }
    }
}

#[derive(clap::Args)]
struct TargetArgs {
    /// A derived label: purchase (within 24 hours) or churn (no visit within 30 days).
    #[arg(long, value_enum, required_unless_present = "labels")]
    derive: Option<Derived>,
    /// Given labels instead: a CSV of user_id, anonymous_id, time, label.
    #[arg(long, requires = "name")]
    labels: Option<PathBuf>,
    /// The model name for given labels.
    #[arg(long)]
    name: Option<String>,
    /// What the model predicts, for given labels.
    #[arg(long, default_value = "the given label")]
    predicts: String,
    /// The end of history, for censoring derived labels (default: the latest event).
    #[arg(long)]
    history_end: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Derived {
    Purchase,
    Churn,
}

#[derive(clap::Args)]
struct LightgbmArgs {
    #[arg(long, default_value_t = TrainOptions::default().rounds)]
    rounds: u32,
    #[arg(long, default_value_t = TrainOptions::default().early_stopping_rounds)]
    early_stopping_rounds: u32,
    #[arg(long, default_value_t = TrainOptions::default().learning_rate)]
    learning_rate: f64,
    #[arg(long, default_value_t = TrainOptions::default().num_leaves)]
    num_leaves: u32,
    #[arg(long, default_value_t = TrainOptions::default().seed)]
    seed: u64,
    /// Weight positives by negatives/positives (inflates probabilities; see the report's
    /// calibration table).
    #[arg(long)]
    balance_classes: bool,
}

impl LightgbmArgs {
    fn options(&self) -> TrainOptions {
        TrainOptions {
            rounds: self.rounds,
            early_stopping_rounds: self.early_stopping_rounds,
            learning_rate: self.learning_rate,
            num_leaves: self.num_leaves,
            seed: self.seed,
            balance_classes: self.balance_classes,
            ..TrainOptions::default()
        }
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Simulate { sim, out } => {
            let histories = simulate::simulate(&sim.config());
            let mut file = std::io::BufWriter::new(std::fs::File::create(&out)?);
            let mut n = 0;
            for h in &histories {
                input::write_events(&mut file, &h.events)?;
                n += h.events.len();
            }
            file.flush()?;
            println!(
                "wrote {n} events of {} people to {}",
                sim.people,
                out.display()
            );
            Ok(())
        }
        Command::Train {
            events,
            target,
            out,
            model_version,
            force,
            lightgbm,
        } => {
            let (examples, name, predicts) = examples(&events, &target)?;
            let split = Split::by_time(&examples);
            let candidate = train::train(&split, &name, &predicts, &lightgbm.options())?;
            conclude(&out, &candidate, &model_version, &split, force)
        }
        Command::Export {
            events,
            target,
            out,
        } => {
            let (examples, name, _) = examples(&events, &target)?;
            export(&examples, &out)?;
            println!(
                "wrote {} {name} examples to {}",
                examples.len(),
                out.display()
            );
            Ok(())
        }
        Command::Evaluate { table, manifest } => {
            let model = Model::load_from_manifest(
                &manifest,
                &nudge_training::train::load_options(),
                Time(0),
            )?;
            let (rows, labels) = read_table(&table, "test")?;
            let p = model.score(&rows)?;
            let e = evaluate(&p, &labels, THRESHOLDS);
            println!(
                "{} {}: test rows {} ROC AUC {:.4} PR AUC {:.4} log loss {:.4}",
                model.manifest.name, model.manifest.version, e.rows, e.auc, e.pr_auc, e.log_loss
            );
            Ok(())
        }
        Command::Segments {
            events,
            k,
            seed,
            segments_version,
            out,
        } => {
            let rows = nudge_training::segments::people(input::read_events(&events)?, None)?;
            let segments = nudge_training::segments::fit(&rows, k, seed, &segments_version)?;
            for s in &segments.segments {
                let centroid: Vec<String> = segments
                    .features
                    .iter()
                    .zip(&s.centroid)
                    .map(|(f, v)| format!("{f}={v:.2}"))
                    .collect();
                println!(
                    "segment {} ({} people): {}\n    {}",
                    s.id,
                    s.size,
                    s.name,
                    centroid.join(" ")
                );
            }
            nudge::model::publish::write_atomically(
                &out,
                toml::to_string_pretty(&segments)?.as_bytes(),
            )?;
            println!("wrote {}", out.display());
            Ok(())
        }
        Command::Defaults {
            out,
            sim,
            model_version,
        } => {
            std::fs::create_dir_all(&out)?;
            let config = sim.config();
            let (days, seed) = (sim.days, sim.seed);
            let histories = simulate::simulate(&config);
            let mut builder = Builder::default();
            for h in &histories {
                for e in &h.events {
                    builder.push(e)?;
                }
            }
            println!(
                "simulated {} people, {} events over {days} days",
                sim.people, builder.events
            );
            let end = config.start.plus_ms(days * DAY_MS);
            let people = nudge_training::segments::people(
                histories
                    .iter()
                    .flat_map(|h| h.events.iter().cloned().map(Ok)),
                Some(end),
            )?;
            let segments = nudge_training::segments::fit(&people, 5, seed, &model_version)?;
            nudge::model::publish::write_atomically(
                &out.join(nudge::segments::SEGMENTS_FILE),
                toml::to_string_pretty(&segments)?.as_bytes(),
            )?;
            println!(
                "wrote {} segments to {}",
                segments.segments.len(),
                out.join(nudge::segments::SEGMENTS_FILE).display()
            );
            let (purchase, churn) = builder.finish(Some(end));
            let options = TrainOptions {
                seed,
                ..TrainOptions::default()
            };
            for (target, examples) in [(Target::Purchase24h, purchase), (Target::Churn30d, churn)] {
                let split = Split::by_time(&examples);
                let candidate =
                    train::train(&split, target.model_name(), target.description(), &options)?;
                conclude(&out, &candidate, &model_version, &split, true)?;
            }
            Ok(())
        }
    }
}

/// Streams the events into examples for the chosen target.
fn examples(events: &Path, target: &TargetArgs) -> anyhow::Result<(Vec<Example>, String, String)> {
    let progress = ProgressBar::new_spinner().with_style(
        ProgressStyle::with_template("{spinner} {msg} {pos} events ({per_sec})")
            .expect("a valid template"),
    );
    progress.set_message(format!("reading {}", events.display()));
    let stream = input::read_events(events)?.inspect(|_| progress.inc(1));
    let result = match (&target.labels, target.derive) {
        (Some(labels), _) => {
            let name = target
                .name
                .clone()
                .context("--name is required with --labels")?;
            let given = input::read_labels(labels)?;
            (
                dataset::examples_for_labels(stream, given)?,
                name,
                target.predicts.clone(),
            )
        }
        (None, Some(derive)) => {
            let mut builder = Builder::default();
            for event in stream {
                builder.push(&event?)?;
            }
            let end = target
                .history_end
                .as_deref()
                .map(input::parse_time)
                .transpose()?;
            let (purchase, churn) = builder.finish(end);
            let (t, examples) = match derive {
                Derived::Purchase => (Target::Purchase24h, purchase),
                Derived::Churn => (Target::Churn30d, churn),
            };
            (
                examples,
                t.model_name().to_owned(),
                t.description().to_owned(),
            )
        }
        (None, None) => bail!("choose --derive or --labels"),
    };
    progress.finish_and_clear();
    Ok(result)
}

/// Prints and writes the report, compares with the published model, and publishes unless
/// the candidate is worse (or `force`).
fn conclude(
    out: &Path,
    candidate: &Candidate,
    version: &str,
    split: &Split,
    force: bool,
) -> anyhow::Result<()> {
    let published = train::evaluate_published(out, &candidate.name, &split.test);
    let mut report = train::report(candidate, version, published.as_ref());
    println!("{report}");
    std::fs::create_dir_all(out)?;
    // Not `<name>-…`: publishing removes unreferenced files of that pattern.
    let stem = format!("{}.{version}", candidate.name);
    report += "\n## Plots\n\n";
    for file in train::plots(out, &stem, candidate)? {
        report += &format!("![{file}]({file})\n");
    }
    let report_path = out.join(format!("{stem}.report.md"));
    std::fs::write(&report_path, &report)?;
    if let train::Verdict::Worse {
        published_version,
        published_auc,
        candidate_auc,
    } = train::judge(candidate, published.as_ref(), force)
    {
        bail!(
            "not published: the published {} {published_version} has test AUC {published_auc:.4}, the candidate {candidate_auc:.4} (use --force to publish anyway); report in {}",
            candidate.name,
            report_path.display()
        );
    }
    let manifest = train::publish(out, candidate, version)?;
    println!(
        "published {} {} -> {}",
        manifest.name,
        manifest.version,
        out.join(&manifest.file).display()
    );
    Ok(())
}

/// The point-in-time table: FeatureSpec columns (empty = missing), label, split, time.
fn export(examples: &[Example], out: &Path) -> anyhow::Result<()> {
    let split = Split::by_time(examples);
    let mut w = csv::Writer::from_path(out)?;
    let mut header: Vec<String> = FeatureSpec::current().names().map(str::to_owned).collect();
    header.extend(["label", "split", "time", "person"].map(String::from));
    w.write_record(&header)?;
    for (part, rows) in [
        ("train", &split.train),
        ("valid", &split.valid),
        ("test", &split.test),
    ] {
        for e in rows.iter() {
            let mut record: Vec<String> = e
                .row
                .values()
                .iter()
                .map(|v| {
                    if v.is_nan() {
                        String::new()
                    } else {
                        format!("{v:?}")
                    }
                })
                .collect();
            record.push(u8::from(e.label).to_string());
            record.push(part.to_owned());
            record.push(input::format_time(e.time));
            record.push(e.person.to_string());
            w.write_record(&record)?;
        }
    }
    w.flush()?;
    Ok(())
}

/// The rows of one split of an exported table.
fn read_table(
    path: &Path,
    part: &str,
) -> anyhow::Result<(Vec<nudge::features::FeatureRow>, Vec<bool>)> {
    let mut r = csv::Reader::from_path(path)?;
    let header = r.headers()?.clone();
    let spec = FeatureSpec::current();
    let columns: Vec<Option<usize>> = header.iter().map(|h| spec.index_of(h)).collect();
    let label = header
        .iter()
        .position(|h| h == "label")
        .context("no label column")?;
    let split = header
        .iter()
        .position(|h| h == "split")
        .context("no split column")?;
    let (mut rows, mut labels) = (Vec::new(), Vec::new());
    for record in r.records() {
        let record = record?;
        if &record[split] != part {
            continue;
        }
        let mut row = nudge::features::FeatureRow::missing();
        for (value, column) in record.iter().zip(&columns) {
            if let (Some(c), false) = (column, value.is_empty()) {
                row.0[*c] = value.parse()?;
            }
        }
        rows.push(row);
        labels.push(&record[label] == "1");
    }
    Ok((rows, labels))
}
