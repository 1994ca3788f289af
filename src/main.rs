//! The `nudge` command: serve, or check models and config offline.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use nudge::config::{Config, LogFormat};
use nudge::features::FeatureSpec;
use nudge::model::{LoadOptions, ModelSet};
use nudge::time::{Clock, SystemClock};

#[derive(Parser)]
#[command(
    name = "nudge",
    version,
    about = "Real-time behavioral scoring and triggers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve {
        /// The TOML config file (defaults apply without one).
        #[arg(long, default_value = "config/nudge.toml")]
        config: PathBuf,
        /// Overrides server.grpc_addr.
        #[arg(long)]
        grpc_addr: Option<std::net::SocketAddr>,
        /// Overrides server.metrics_addr.
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Overrides server.http_addr (the Segment-compatible HTTP API, on when
        /// server.http_write_keys_file is set).
        #[arg(long)]
        http_addr: Option<std::net::SocketAddr>,
    },
    /// Validate a config file (and NUDGE__ overrides) and print the result.
    CheckConfig {
        #[arg(default_value = "config/nudge.toml")]
        config: PathBuf,
    },
    /// Load every model in a directory with all serving checks; exit 1 if any is refused.
    CheckModels {
        #[arg(default_value = "models")]
        dir: PathBuf,
        /// The ONNX Runtime library (default: $ORT_DYLIB_PATH, then libonnxruntime.so).
        #[arg(long)]
        onnxruntime_library: Option<PathBuf>,
    },
    /// Write the manifest for a model file (for example one trained in Python) into the
    /// file's directory, so the server can load it. The model is loaded with every check
    /// the server makes first; one the server would refuse gets no manifest (exit 1).
    Manifest {
        /// The model file; its directory is where the manifest goes.
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        /// What the model predicts, for people.
        #[arg(long)]
        predicts: String,
        /// lightgbm or onnx (default: from the file's extension, .onnx or else lightgbm).
        #[arg(long)]
        format: Option<String>,
        /// The FeatureSpec names of the model's columns, in order, comma-separated. A
        /// LightGBM file's own column names are used when this is not given.
        #[arg(long, value_delimiter = ',')]
        features: Vec<String>,
        /// The ONNX Runtime library, for checking an ONNX model (default: $ORT_DYLIB_PATH,
        /// then libonnxruntime.so).
        #[arg(long)]
        onnxruntime_library: Option<PathBuf>,
    },
    /// Serve a model's previous version again (swaps its manifest with the kept previous
    /// one; a running server picks it up). Run again to undo.
    Rollback {
        /// The model's name.
        name: String,
        #[arg(long, default_value = "models")]
        models: PathBuf,
    },
    /// Rewrite the store with only its live data, so that erased people leave the files at
    /// once. Offline: stop the server first.
    Compact {
        #[arg(long, default_value = "config/nudge.toml")]
        config: PathBuf,
    },
    /// Check a trigger rules file without starting the server: every problem is listed,
    /// and the exit status is non-zero if there is one.
    CheckRules {
        #[arg(default_value = "config/rules.toml")]
        file: PathBuf,
    },
    /// Manage API keys (the `auth.keys_file`).
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Print the FeatureSpec: names, or names with definitions as Markdown or JSON.
    Features {
        #[arg(long, value_enum, default_value = "names")]
        format: FeaturesFormat,
    },
}

#[derive(Subcommand)]
enum KeysAction {
    /// Make a new key: prints it once (store it in the caller's secrets) and appends its
    /// SHA-256, name and scopes to FILE (made, mode 0600, when missing). A running server
    /// picks it up. Revoke a key by deleting its entry.
    Add {
        /// The key's name, as metrics and logs show it.
        name: String,
        /// What the key may do, comma-separated: track, score, read, admin, metrics.
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<String>,
        /// The keys file.
        #[arg(long)]
        file: PathBuf,
        /// Requests a second the key may make (0: no limit).
        #[arg(long, default_value_t = 0.0)]
        requests_per_second: f64,
        /// Requests that may come at once above the rate (0: one second's worth).
        #[arg(long, default_value_t = 0)]
        burst: u32,
    },
    /// Check a keys file and list its keys' names.
    List {
        #[arg(long)]
        file: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FeaturesFormat {
    Names,
    Markdown,
    Json,
}

fn keys(action: KeysAction) -> anyhow::Result<()> {
    use nudge::security::keys::{self, Keys, Scope};
    match action {
        KeysAction::Add {
            name,
            scopes,
            file,
            requests_per_second,
            burst,
        } => {
            let scopes = scopes
                .iter()
                .map(|s| Scope::parse(s.trim()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!("--scopes: {e}"))?;
            let key = keys::add(&file, &name, &scopes, requests_per_second, burst)
                .map_err(|e| anyhow::anyhow!(e))?;
            eprintln!(
                "added key {name:?} to {}; it is shown once, here:",
                file.display()
            );
            println!("{key}");
            Ok(())
        }
        KeysAction::List { file } => {
            let keys = Keys::load(&file).map_err(|e| anyhow::anyhow!(e))?;
            for name in keys.current().names() {
                println!("{name}");
            }
            Ok(())
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            grpc_addr,
            metrics_addr,
            http_addr,
        } => {
            let mut config = load_config(&config)?;
            if let Some(addr) = grpc_addr {
                config.server.grpc_addr = addr;
            }
            if let Some(addr) = metrics_addr {
                config.server.metrics_addr = addr;
            }
            if let Some(addr) = http_addr {
                config.server.http_addr = addr;
            }
            config.validate()?;
            init_tracing(&config);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(serve(config))
        }
        Command::CheckRules { file } => {
            let rules = nudge::trigger::rules::RuleSet::load(&file)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            println!(
                "{}: {} rules, version {}",
                file.display(),
                rules.rules.len(),
                rules.version
            );
            for rule in &rules.rules {
                println!(
                    "  {:<28} priority {:>3}  {}",
                    rule.name,
                    rule.priority,
                    rule.describe()
                );
            }
            Ok(())
        }
        Command::Keys { action } => keys(action),
        Command::CheckConfig { config } => {
            let config = load_config(&config)?;
            println!("{config:#?}");
            Ok(())
        }
        Command::CheckModels {
            dir,
            onnxruntime_library,
        } => check_models(&dir, onnxruntime_library),
        Command::Manifest {
            model,
            name,
            version,
            predicts,
            format,
            features,
            onnxruntime_library,
        } => write_manifest(
            &model,
            name,
            version,
            predicts,
            format,
            features,
            onnxruntime_library,
        ),
        Command::Rollback { name, models } => {
            let (from, to) = nudge::model::publish::rollback(&models, &name)
                .with_context(|| format!("rolling back {name} in {}", models.display()))?;
            println!("{name}: {from} -> {to}");
            Ok(())
        }
        Command::Compact { config } => {
            let config = load_config(&config)?;
            let before = disk_usage(&config.store.dir);
            nudge::store::Store::vacuum(&config.store.dir)
                .with_context(|| format!("compacting {}", config.store.dir.display()))?;
            println!(
                "compacted {}: {before} -> {} bytes on disk (allocated blocks, as du counts; \
                 journals are sparse, so their apparent sizes are larger)",
                config.store.dir.display(),
                disk_usage(&config.store.dir)
            );
            Ok(())
        }
        Command::Features { format } => {
            print_features(format);
            Ok(())
        }
    }
}

fn load_config(path: &std::path::Path) -> anyhow::Result<Config> {
    // A missing default config file is fine (defaults apply); a named one must exist.
    let path = path.exists().then_some(path);
    Ok(Config::load(path, std::env::vars())?)
}

fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let server = nudge::app::Server::bind(config, Arc::new(SystemClock)).await?;
    server.run(shutdown_signal()).await
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

/// The options the server loads models with by default, with another ONNX Runtime library
/// if one is named.
fn load_options(library: Option<PathBuf>) -> LoadOptions {
    let mut config = Config::default();
    if let Some(library) = library {
        config.models.onnxruntime_library = library.display().to_string();
    }
    LoadOptions::from(&config)
}

fn check_models(dir: &std::path::Path, library: Option<PathBuf>) -> anyhow::Result<()> {
    let options = load_options(library);
    let (set, failures) = ModelSet::load_dir(dir, &options, SystemClock.now())
        .with_context(|| format!("reading {}", dir.display()))?;
    for model in set.iter() {
        let m = &model.manifest;
        println!(
            "ok      {} {} ({}, {} features): {}",
            m.name,
            m.version,
            m.format.as_str(),
            m.features.len(),
            m.predicts
        );
    }
    for failure in &failures {
        println!(
            "REFUSED {} [{}]: {}",
            failure.manifest.display(),
            failure.error.reason(),
            failure.error
        );
    }
    if failures.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{} model(s) refused", failures.len())
    }
}

/// Writes a manifest for a model file, after loading it with every check the server makes
/// at load, so a manifest the server would refuse is never written.
fn write_manifest(
    model: &std::path::Path,
    name: String,
    version: String,
    predicts: String,
    format: Option<String>,
    features: Vec<String>,
    library: Option<PathBuf>,
) -> anyhow::Result<()> {
    use nudge::model::manifest::{sha256_hex, Manifest, ModelFormat};
    use nudge::model::{file_feature_names, LoadError, Model};
    let bytes = std::fs::read(model).with_context(|| format!("reading {}", model.display()))?;
    let format = match format.as_deref() {
        Some("lightgbm") => ModelFormat::Lightgbm,
        Some("onnx") => ModelFormat::Onnx,
        Some(other) => anyhow::bail!("format {other:?} is neither lightgbm nor onnx"),
        None if model.extension().is_some_and(|e| e == "onnx") => ModelFormat::Onnx,
        None => ModelFormat::Lightgbm,
    };
    let options = load_options(library);
    let refused = |e: LoadError| {
        anyhow::anyhow!(
            "{}: the server would refuse this model [{}]: {e}",
            model.display(),
            e.reason()
        )
    };
    let features = if features.is_empty() {
        file_feature_names(format, &bytes, &options)
            .map_err(refused)?
            .context("the model file names no features; pass --features")?
    } else {
        features
    };
    let manifest = Manifest {
        file: model
            .file_name()
            .context("the model path has no file name")?
            .to_string_lossy()
            .into_owned(),
        sha256: sha256_hex(&bytes),
        name,
        version,
        format,
        predicts,
        features,
        feature_spec_version: Some(nudge::features::SPEC_VERSION.to_owned()),
        training: Default::default(),
    };
    let manifest = Model::load_unwritten(manifest, &bytes, &options, SystemClock.now())
        .map_err(refused)?
        .manifest;
    let dir = model.parent().unwrap_or(std::path::Path::new("."));
    let path = Manifest::path_in(dir, &manifest.name);
    nudge::model::publish::write_atomically(&path, manifest.to_toml().as_bytes())?;
    println!("wrote {}", path.display());
    Ok(())
}

/// The bytes allocated on disk under `dir`. Not the files' lengths: fjall preallocates its
/// journals as sparse 64 MiB files, so lengths would report 64 MiB for a nearly empty store.
fn disk_usage(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => disk_usage(&e.path()),
                    // st_blocks counts 512-byte units whatever the file system's block size.
                    Ok(m) => m.blocks() * 512,
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn print_features(format: FeaturesFormat) {
    let spec = FeatureSpec::current();
    match format {
        FeaturesFormat::Names => spec.names().for_each(|n| println!("{n}")),
        FeaturesFormat::Markdown => {
            println!(
                "FeatureSpec version {}, hash `{}`.\n",
                spec.version, spec.hash
            );
            println!("| # | feature | definition |\n|---|---|---|");
            for (i, f) in spec.features.iter().enumerate() {
                println!("| {i} | `{}` | {} |", f.name, f.description);
            }
        }
        FeaturesFormat::Json => {
            let features: Vec<_> = spec
                .features
                .iter()
                .map(|f| serde_json::json!({"name": f.name, "description": f.description}))
                .collect();
            let doc = serde_json::json!({
                "version": spec.version,
                "hash": spec.hash,
                "features": features,
            });
            println!("{doc:#}");
        }
    }
}
