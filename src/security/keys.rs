//! API keys: the keys file (names, scopes and rate limits, with only each key's SHA-256),
//! checking a presented key, and making a new one.
//!
//! A key is `nudge_` and 43 characters of base64url: 256 random bits. Because a key is
//! that random, one unsalted SHA-256 is enough to store it (as GitHub and Stripe store
//! tokens): nobody can guess a key from its hash, and lookups are a hash-map read. The
//! key itself exists only in the output of `nudge keys add` and in the callers' secrets.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// What a key may do. Scopes are independent: `admin` does not imply `read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Track, TrackStream, Identify.
    Track,
    /// Score.
    Score,
    /// GetProfile, ListModels, ExplainTriggers, GetExperimentReport, SubscribeTriggers.
    Read,
    /// DeleteUser, ReloadModels, ReloadRules, ListDeadLetters.
    Admin,
    /// `GET /metrics`, when `auth.metrics_require_key` is on.
    Metrics,
}

impl Scope {
    pub const ALL: [Scope; 5] = [
        Scope::Track,
        Scope::Score,
        Scope::Read,
        Scope::Admin,
        Scope::Metrics,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Track => "track",
            Scope::Score => "score",
            Scope::Read => "read",
            Scope::Admin => "admin",
            Scope::Metrics => "metrics",
        }
    }

    pub fn parse(text: &str) -> Result<Scope, String> {
        Scope::ALL
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| {
                format!(
                    "unknown scope {text:?}; the scopes are track, score, read, admin and metrics"
                )
            })
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The prefix of every key, so a leaked one is recognisable (secret scanners, logs).
pub const KEY_PREFIX: &str = "nudge_";

/// One entry of the keys file as written.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    /// The SHA-256 of the whole key (prefix included), in hex.
    sha256: String,
    scopes: Vec<Scope>,
    /// Requests a second this key may make (0: no limit). A TrackStream message counts as
    /// a request.
    #[serde(default)]
    requests_per_second: f64,
    /// Requests that may come at once above the rate; 0: one second's worth.
    #[serde(default)]
    burst: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    key: Vec<Entry>,
}

type Limiter = governor::DefaultDirectRateLimiter;

/// The caller a key names: what the auth layer puts in a request's extensions.
pub struct Caller {
    pub name: String,
    scopes: Vec<Scope>,
    limit: Option<(f64, u32)>,
    limiter: Option<Limiter>,
}

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Caller")
            .field("name", &self.name)
            .field("scopes", &self.scopes)
            .field("limit", &self.limit)
            .finish()
    }
}

impl Caller {
    pub fn may(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    /// Takes one request from the key's rate limit: `Err(wait)` when it has none left,
    /// with how long until it has one.
    pub fn admit(&self) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter.check().map_err(|not_until| {
            use governor::clock::Clock as _;
            not_until.wait_time_from(governor::clock::DefaultClock::default().now())
        })
    }
}

/// Why a presented key was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `authorization` header.
    Missing,
    /// Not `Bearer <key>`.
    Malformed,
    /// A key the keys file does not hold.
    Unknown,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Malformed => "malformed",
            Refusal::Unknown => "unknown",
        }
    }
}

/// The keys in force: read from the keys file, replaced whole when it changes.
#[derive(Default)]
pub struct KeySet {
    by_hash: HashMap<[u8; 32], Arc<Caller>>,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&str> = self.by_hash.values().map(|c| c.name.as_str()).collect();
        names.sort_unstable();
        f.debug_struct("KeySet").field("names", &names).finish()
    }
}

impl KeySet {
    /// Parses a keys file's text. `previous` lends its rate limiters to keys whose hash and
    /// limits did not change, so a reload does not hand every caller a fresh burst.
    pub fn parse(text: &str, previous: Option<&KeySet>) -> Result<KeySet, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut by_hash = HashMap::new();
        let mut names = std::collections::HashSet::new();
        for (i, e) in file.key.into_iter().enumerate() {
            let at = format!("key[{i}] ({:?})", e.name);
            if e.name.is_empty() || e.name.len() > 64 || !e.name.chars().all(name_char) {
                return Err(format!(
                    "{at}: name must be 1 to 64 characters of letters, digits, '-', '_' and '.'"
                ));
            }
            if !names.insert(e.name.clone()) {
                return Err(format!("{at}: a second key has this name"));
            }
            let hash = decode_hash(&e.sha256).map_err(|m| format!("{at}: sha256: {m}"))?;
            if e.scopes.is_empty() {
                return Err(format!("{at}: scopes: give at least one scope"));
            }
            if !(e.requests_per_second.is_finite() && e.requests_per_second >= 0.0) {
                return Err(format!(
                    "{at}: requests_per_second must be 0 (no limit) or a positive number"
                ));
            }
            let limit = (e.requests_per_second > 0.0).then(|| {
                let burst = match e.burst {
                    0 => e.requests_per_second.ceil().min(u32::MAX as f64) as u32,
                    b => b,
                };
                (e.requests_per_second, burst.max(1))
            });
            let reused = previous
                .and_then(|p| p.by_hash.get(&hash))
                .filter(|c| c.limit == limit && c.name == e.name && c.scopes == e.scopes);
            let caller = match reused {
                Some(c) => c.clone(),
                None => Arc::new(Caller {
                    limiter: limit.map(|(rate, burst)| limiter(rate, burst)),
                    name: e.name,
                    scopes: e.scopes,
                    limit,
                }),
            };
            if by_hash.insert(hash, caller).is_some() {
                return Err(format!("{at}: the same key is listed twice"));
            }
        }
        Ok(KeySet { by_hash })
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The caller an `authorization` header value names.
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<Arc<Caller>, Refusal> {
        let value = authorization.ok_or(Refusal::Missing)?;
        let value = std::str::from_utf8(value).map_err(|_| Refusal::Malformed)?;
        let (scheme, key) = value.trim().split_once(' ').ok_or(Refusal::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Refusal::Malformed);
        }
        let digest: [u8; 32] = Sha256::digest(key.trim().as_bytes()).into();
        self.by_hash.get(&digest).cloned().ok_or(Refusal::Unknown)
    }

    /// The names of the keys, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.by_hash.values().map(|c| c.name.clone()).collect();
        names.sort_unstable();
        names
    }
}

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

fn decode_hash(text: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(text.trim()).map_err(|e| format!("not hex: {e}"))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("{} bytes; a SHA-256 is 32", b.len()))
}

fn limiter(rate: f64, burst: u32) -> Limiter {
    let period = Duration::from_secs_f64(1.0 / rate).max(Duration::from_nanos(1));
    let quota = governor::Quota::with_period(period)
        .expect("a positive period")
        .allow_burst(NonZeroU32::new(burst).expect("burst is at least 1"));
    governor::RateLimiter::direct(quota)
}

/// The keys file in force, swapped whole on reload: readers never wait.
pub struct Keys {
    current: ArcSwap<KeySet>,
}

impl Keys {
    pub fn new(set: KeySet) -> Keys {
        Keys {
            current: ArcSwap::from_pointee(set),
        }
    }

    /// Reads the keys file.
    pub fn load(path: &Path) -> Result<Keys, String> {
        Ok(Keys::new(read(path, None)?))
    }

    pub fn current(&self) -> arc_swap::Guard<Arc<KeySet>> {
        self.current.load()
    }

    /// Reads the keys file again; on a problem the keys in force stay, and the problem is
    /// returned.
    pub fn reload(&self, path: &Path) -> Result<usize, String> {
        let next = read(path, Some(&self.current.load()))?;
        let n = next.len();
        self.current.store(Arc::new(next));
        Ok(n)
    }
}

fn read(path: &Path, previous: Option<&KeySet>) -> Result<KeySet, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading the keys file {}: {e}", path.display()))?;
    KeySet::parse(&text, previous).map_err(|e| format!("the keys file {}: {e}", path.display()))
}

/// A new random key and the entry that stores its hash, as TOML to append to a keys file.
pub fn generate(
    name: &str,
    scopes: &[Scope],
    requests_per_second: f64,
    burst: u32,
) -> Result<(String, String), String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("the system's random source: {e}"))?;
    let key = format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let scopes: Vec<String> = scopes.iter().map(|s| format!("{:?}", s.as_str())).collect();
    let mut entry = format!(
        "\n[[key]]\nname = {name:?}\nsha256 = \"{}\"\nscopes = [{}]\n",
        hex::encode(Sha256::digest(key.as_bytes())),
        scopes.join(", "),
    );
    if requests_per_second > 0.0 {
        entry += &format!("requests_per_second = {requests_per_second}\n");
    }
    if burst > 0 {
        entry += &format!("burst = {burst}\n");
    }
    // What is appended must itself be a valid file, so a typo in the name cannot corrupt
    // the file it joins.
    KeySet::parse(&entry, None)?;
    Ok((key, entry))
}

/// Adds a new key to the keys file at `path` (made, mode 0600, when missing) and returns
/// the key. The file is replaced by a rename, so a server watching it never reads half.
pub fn add(
    path: &Path,
    name: &str,
    scopes: &[Scope],
    requests_per_second: f64,
    burst: u32,
) -> Result<String, String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            "# Nudge API keys: each key's SHA-256, never the key. Add keys with `nudge keys add`;\n\
             # delete an entry to revoke its key. A running server reloads this file on change.\n"
                .to_owned()
        }
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    let (key, entry) = generate(name, scopes, requests_per_second, burst)?;
    let text = existing + &entry;
    KeySet::parse(&text, None).map_err(|e| format!("{}: {e}", path.display()))?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let temp = path.with_extension("tmp-new");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&temp, path)?;
        if let Some(dir) = dir {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_with(key: &str, extra: &str) -> KeySet {
        let text = format!(
            "[[key]]\nname = \"svc\"\nsha256 = \"{}\"\nscopes = [\"score\", \"read\"]\n{extra}",
            hex::encode(Sha256::digest(key.as_bytes()))
        );
        KeySet::parse(&text, None).unwrap()
    }

    #[test]
    fn a_listed_key_names_its_caller_and_its_scopes() {
        let set = set_with("nudge_abc", "");
        let caller = set.check(Some(b"Bearer nudge_abc")).unwrap();
        assert_eq!(caller.name, "svc");
        assert!(caller.may(Scope::Score) && caller.may(Scope::Read));
        assert!(!caller.may(Scope::Admin) && !caller.may(Scope::Track));
        assert!(set.check(Some(b"bearer  nudge_abc ")).is_ok());
    }

    #[test]
    fn a_missing_malformed_or_unknown_key_is_refused_with_its_reason() {
        let set = set_with("nudge_abc", "");
        assert_eq!(set.check(None).unwrap_err(), Refusal::Missing);
        assert_eq!(
            set.check(Some(b"nudge_abc")).unwrap_err(),
            Refusal::Malformed
        );
        assert_eq!(
            set.check(Some(b"Basic nudge_abc")).unwrap_err(),
            Refusal::Malformed
        );
        assert_eq!(
            set.check(Some(&[0xff, 0x20, 0x41])).unwrap_err(),
            Refusal::Malformed
        );
        assert_eq!(
            set.check(Some(b"Bearer nudge_abd")).unwrap_err(),
            Refusal::Unknown
        );
    }

    #[test]
    fn a_generated_key_is_stored_by_its_hash_only() {
        let (key, entry) = generate("checkout", &[Scope::Track], 0.0, 0).unwrap();
        assert!(key.starts_with(KEY_PREFIX) && key.len() == KEY_PREFIX.len() + 43);
        assert!(!entry.contains(&key[KEY_PREFIX.len()..]), "{entry}");
        let set = KeySet::parse(&entry, None).unwrap();
        let auth = format!("Bearer {key}");
        assert_eq!(set.check(Some(auth.as_bytes())).unwrap().name, "checkout");
    }

    #[test]
    fn bad_entries_are_refused_naming_the_entry_and_field() {
        let hash = hex::encode(Sha256::digest(b"k"));
        for (entry, expect) in [
            (format!("name = \"a b\"\nsha256 = \"{hash}\"\nscopes = [\"read\"]"), "name"),
            ("name = \"a\"\nsha256 = \"12\"\nscopes = [\"read\"]".to_owned(), "sha256"),
            (format!("name = \"a\"\nsha256 = \"{hash}\"\nscopes = []"), "scopes"),
            (format!("name = \"a\"\nsha256 = \"{hash}\"\nscopes = [\"root\"]"), "root"),
            (
                format!("name = \"a\"\nsha256 = \"{hash}\"\nscopes = [\"read\"]\nrequests_per_second = -1"),
                "requests_per_second",
            ),
        ] {
            let e = KeySet::parse(&format!("[[key]]\n{entry}\n"), None).unwrap_err();
            assert!(e.contains(expect), "{expect}: {e}");
        }
        let twice = format!(
            "[[key]]\nname = \"a\"\nsha256 = \"{hash}\"\nscopes = [\"read\"]\n[[key]]\nname = \"a\"\nsha256 = \"{}\"\nscopes = [\"read\"]\n",
            hex::encode(Sha256::digest(b"j"))
        );
        assert!(KeySet::parse(&twice, None)
            .unwrap_err()
            .contains("second key"));
    }

    #[test]
    fn a_key_over_its_rate_waits_and_a_reload_keeps_its_bucket() {
        let set = set_with("nudge_abc", "requests_per_second = 1\nburst = 2\n");
        let caller = set.check(Some(b"Bearer nudge_abc")).unwrap();
        assert!(caller.admit().is_ok() && caller.admit().is_ok());
        let wait = caller.admit().unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        let text = format!(
            "[[key]]\nname = \"svc\"\nsha256 = \"{}\"\nscopes = [\"score\", \"read\"]\nrequests_per_second = 1\nburst = 2\n",
            hex::encode(Sha256::digest(b"nudge_abc"))
        );
        let reloaded = KeySet::parse(&text, Some(&set)).unwrap();
        let again = reloaded.check(Some(b"Bearer nudge_abc")).unwrap();
        assert!(
            again.admit().is_err(),
            "a reload must not refill the bucket"
        );
    }

    #[test]
    fn keys_add_makes_a_private_file_and_appends_to_it() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let a = add(&path, "a", &[Scope::Track], 0.0, 0).unwrap();
        let b = add(&path, "b", &[Scope::Admin], 10.0, 5).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let keys = Keys::load(&path).unwrap();
        assert_eq!(keys.current().names(), ["a", "b"]);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&a) && !text.contains(&b));
        assert!(add(&path, "a", &[Scope::Read], 0.0, 0)
            .unwrap_err()
            .contains("second key"));
    }
}
