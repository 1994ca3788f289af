//! The LightGBM backend: text model files scored by Nudge's native scorer
//! ([`super::native`]) by default, or through LightGBM's C API (`lightgbm3`) where the
//! native scorer does not serve the model or the configuration asks for LightGBM.
//!
//! LightGBM itself loads every model either way: it is the parser of record (a file it
//! refuses is refused) and the validator of the native scorer, which serves only after
//! it has given LightGBM's raw scores and probabilities, to the bit, on rows made to
//! sit on and beside every threshold of the model ([`Forest::probe_rows`]).

use lightgbm3::Booster;

use super::native::lightgbm::header_keys;
use super::native::{Forest, Kernel};
use super::{Engine, LoadError, ScoreError, Scorer};

/// Rows the native scorer must score exactly as LightGBM does before it serves a model.
const PARITY_ROWS: usize = 512;

/// Builds the scorer for a LightGBM text model on `engine`. With the native engine, a
/// model it does not serve (or that fails the parity check, which would be a defect)
/// is served by LightGBM, and the reason is returned beside the scorer.
pub fn scorer(text: &str, engine: Engine) -> Result<(Box<dyn Scorer>, Option<String>), LoadError> {
    let lightgbm = LightgbmScorer::from_text(text)?;
    if engine == Engine::Lightgbm {
        return Ok((Box::new(lightgbm), None));
    }
    match Forest::from_lightgbm(text).and_then(|forest| {
        check_parity(&forest, &lightgbm)?;
        Ok(forest)
    }) {
        Ok(forest) => Ok((
            Box::new(NativeScorer {
                forest,
                feature_names: lightgbm.feature_names(),
            }),
            None,
        )),
        Err(reason) => Ok((Box::new(lightgbm), Some(reason))),
    }
}

/// Holds the native scorer to LightGBM's raw scores and probabilities, bit for bit, on
/// every kernel this CPU runs and through both walks.
pub(crate) fn check_parity(forest: &Forest, lightgbm: &LightgbmScorer) -> Result<(), String> {
    let n = forest.n_features();
    let rows = forest.probe_rows(PARITY_ROWS);
    let raw = lightgbm.raw_scores(&rows, n).map_err(|e| e.to_string())?;
    let probabilities = lightgbm.predict(&rows, n).map_err(|e| e.to_string())?;
    for kernel in Kernel::available() {
        let forest = forest
            .clone()
            .with_kernel(kernel)
            .expect("an available kernel");
        let many = forest.predict_raw_many(&rows);
        let one = rows
            .chunks_exact(n)
            .take(32)
            .map(|r| forest.predict_raw_one(r));
        let mismatch = many
            .iter()
            .zip(&raw)
            .position(|(a, b)| a.to_bits() != b.to_bits())
            .or_else(|| one.zip(&raw).position(|(a, b)| a.to_bits() != b.to_bits()))
            .or_else(|| {
                many.iter()
                    .zip(&probabilities)
                    .position(|(a, b)| forest.finish(*a).to_bits() != b.to_bits())
            });
        if let Some(row) = mismatch {
            return Err(format!(
                "the native scorer ({}) differs from LightGBM on parity row {row}: {} vs {}",
                kernel.name(),
                many[row],
                raw[row]
            ));
        }
    }
    Ok(())
}

/// The native scorer serving a LightGBM model.
pub struct NativeScorer {
    forest: Forest,
    feature_names: Option<Vec<String>>,
}

impl NativeScorer {
    /// A native scorer for a compiled forest, unchecked: the loader checks it against
    /// LightGBM first ([`scorer`]); benchmarks build one per kernel.
    pub fn new(forest: Forest, feature_names: Option<Vec<String>>) -> NativeScorer {
        NativeScorer {
            forest,
            feature_names,
        }
    }

    pub fn forest(&self) -> &Forest {
        &self.forest
    }
}

impl Scorer for NativeScorer {
    fn predict(&self, rows: &[f64], n_columns: usize) -> Result<Vec<f64>, ScoreError> {
        if n_columns != self.forest.n_features() || !rows.len().is_multiple_of(n_columns) {
            return Err(ScoreError::Backend(format!(
                "{} values are not rows of the model's {} columns",
                rows.len(),
                self.forest.n_features()
            )));
        }
        Ok(self.forest.predict(rows))
    }

    fn num_features(&self) -> usize {
        self.forest.n_features()
    }

    fn feature_names(&self) -> Option<Vec<String>> {
        self.feature_names.clone()
    }

    fn contributions(&self, row: &[f64]) -> Option<Result<Vec<f64>, ScoreError>> {
        self.forest.contributions(row).map(Ok)
    }

    fn engine(&self) -> String {
        format!("native/{}", self.forest.kernel().name())
    }
}

/// A LightGBM booster.
pub struct LightgbmScorer {
    booster: SyncBooster,
    num_features: usize,
    feature_names: Vec<String>,
    /// The compiled trees, for path attributions; `None` for models the native layout
    /// does not hold (LightGBM's TreeSHAP explains those).
    forest: Option<Forest>,
}

/// `lightgbm3::Booster` holds a raw handle and so is neither `Send` nor `Sync`.
struct SyncBooster(Booster);

// SAFETY: the handle points to a LightGBM `Booster` object on the C++ heap that is not tied
// to the thread that created it, so moving it between threads is sound. Sharing it is sound
// because Nudge only calls prediction and read-only accessors through `&self`, and
// LightGBM 4.7 takes a shared lock around prediction (`Booster::Predict*` in c_api.cpp
// lock `mutex_` for reading, and only mutating calls take it for writing). Nothing here calls
// `single_row_fast_init` or other `&mut self` methods after construction.
unsafe impl Send for SyncBooster {}
// SAFETY: see above.
unsafe impl Sync for SyncBooster {}

impl LightgbmScorer {
    /// Parses a model from its text, after checking that the text is whole.
    pub fn from_text(text: &str) -> Result<LightgbmScorer, LoadError> {
        // LightGBM reads the text as a C string, which ends at a NUL (lightgbm3 panics on
        // one); no LightGBM model holds one.
        if let Some(at) = text.find('\0') {
            return Err(LoadError::Parse(format!(
                "the file has a NUL at byte {at}; a LightGBM text model has none"
            )));
        }
        check_complete(text).map_err(LoadError::Parse)?;
        check_links(text).map_err(LoadError::Parse)?;
        let booster = guard(|| Booster::from_string(text))
            .map_err(LoadError::Parse)?
            .map_err(|e| LoadError::Parse(e.to_string()))?;
        if booster.num_classes() != 1 {
            return Err(LoadError::Parse(format!(
                "the model has {} outputs per row; Nudge serves binary classifiers (1 output)",
                booster.num_classes()
            )));
        }
        let num_features = usize::try_from(booster.num_features()).unwrap_or(0);
        let feature_names = booster
            .feature_name()
            .map_err(|e| LoadError::Parse(e.to_string()))?;
        Ok(LightgbmScorer {
            booster: SyncBooster(booster),
            num_features,
            feature_names,
            forest: Forest::from_lightgbm(text).ok(),
        })
    }

    /// The sums of the trees, before the objective's transform.
    pub fn raw_scores(&self, rows: &[f64], n_columns: usize) -> Result<Vec<f64>, ScoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        guard(|| self.booster.0.raw_scores(rows, n_columns as i32, true))
            .map_err(ScoreError::Backend)?
            .map_err(|e| ScoreError::Backend(e.to_string()))
    }
}

/// Checks that a LightGBM text model is whole before LightGBM parses it. LightGBM reads
/// trees at the offsets its `tree_sizes` header gives, so a truncated file makes it read
/// past the end of the text (seen here as garbage in its error messages, and as truncated
/// files that sometimes loaded).
fn check_complete(text: &str) -> Result<(), String> {
    if !text.contains("\nend of trees") {
        return Err("the file is incomplete: it has no \"end of trees\" line (truncated?)".into());
    }
    if let Some(sizes) = text.lines().find_map(|l| l.strip_prefix("tree_sizes=")) {
        let total = sizes
            .split(' ')
            .map(|n| {
                n.parse::<usize>()
                    .map_err(|_| format!("tree_sizes has {n:?}, not a size"))
            })
            .sum::<Result<usize, String>>()?;
        if total > text.len() {
            return Err(format!(
                "the header's tree_sizes add up to {total} bytes, more than the {} the file has",
                text.len()
            ));
        }
    }
    Ok(())
}

/// Checks the header's counts and every tree's node links and split features before
/// LightGBM reads them, because LightGBM trusts them: a child that points back up its tree makes its prediction loop
/// forever (the fuzz target `lightgbm_load` found one: a `left_child` line with a stray
/// token, which LightGBM reads as 0, the root), and a child or a feature out of range
/// makes it read outside its arrays (a segmentation fault). Each tree must be a tree:
/// every internal node reached exactly once from the root, every child and leaf index
/// within `num_leaves`, every split feature within the header's `max_feature_idx`, and no
/// key given twice in the header or a tree. What this does not look at (values, other
/// keys), LightGBM checks itself.
fn check_links(text: &str) -> Result<(), String> {
    check_line_ends(text)?;
    let Some((header, trees)) = text.split_once("\nTree=") else {
        // No trees: nothing to walk, and LightGBM refuses the file or loads no tree.
        return Ok(());
    };
    // The header's keys and values as LightGBM reads them: a bare `num_class` line is
    // `num_class` with an empty value to LightGBM, which reads it as 0 and, with no
    // num_tree_per_iteration, divides by it (SIGFPE, found by the long pass of
    // `lightgbm_load`); a line for `name=` alone missed it. LightGBM keeps the last line of
    // a key given twice, and the native scorer reads the first: such a file is refused.
    let keys = header_keys(header);
    let mut seen = std::collections::HashSet::new();
    if let Some((key, _)) = keys.iter().find(|(key, _)| !seen.insert(*key)) {
        return Err(format!("the header: {} appears twice", key_name(key)));
    }
    let value = |name: &str| keys.iter().find(|(key, _)| *key == name).map(|(_, v)| *v);
    // LightGBM reads these into an `int` without a range check, and divides by
    // num_tree_per_iteration: 18446744073709551616 wraps to 0 and kills the process
    // (SIGFPE), as the fuzz target `lightgbm_load` found.
    let count = |name: &str, min: i64, max: i64| -> Result<Option<i64>, String> {
        let Some(v) = value(name) else {
            return Ok(None);
        };
        match v.trim().parse::<i64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(format!(
                "{name}={v} is not a whole number from {min} to {max}"
            )),
        }
    };
    let int = i64::from(i32::MAX);
    let classes = count("num_class", 1, int)?;
    let per_iteration = count("num_tree_per_iteration", 1, int)?;
    // Nudge serves binary classifiers: one output, one tree per iteration (LightGBM's
    // `binary` objective writes both as 1). Refused before LightGBM reads them, because
    // LightGBM trusts the pair: `num_tree_per_iteration=2` beside `num_class=1` made it
    // write past a buffer sized by the one and corrupt the heap (the fuzz target
    // `lightgbm_load` found it; the process died later, in an unrelated allocation).
    if let Some(classes @ 2..) = classes {
        return Err(format!(
            "num_class={classes}: the model has {classes} outputs per row; Nudge serves \
             binary classifiers (1 output)"
        ));
    }
    if let Some(trees @ 2..) = per_iteration {
        return Err(format!(
            "num_tree_per_iteration={trees}: a binary classifier has one tree per iteration"
        ));
    }
    // LightGBM takes the objective's name as the first space-separated word of this line
    // and reads that word without checking there is one: an empty `objective=` was a
    // SIGSEGV (found by the long pass of `lightgbm_load`).
    if let Some(objective) = value("objective") {
        if objective.split(' ').all(str::is_empty) {
            return Err("objective= names no objective".into());
        }
    }
    // What the native scorer serves (LightGBM sizes buffers by it too).
    let widest = super::native::ensemble::MAX_FEATURES as i64 - 1;
    let max_feature = count("max_feature_idx", 0, widest)?;
    let trees = trees.split("\nend of trees").next().unwrap_or(trees);
    for (t, block) in trees.split("\nTree=").enumerate() {
        check_tree_links(block, max_feature).map_err(|e| format!("tree {t}: {e}"))?;
    }
    check_tree_sizes(value("tree_sizes"), trees)
}

/// Refuses a carriage return that no line feed follows. LightGBM ends a line at a CR as
/// at an LF (`GetLine`, and its tree reader); `str::lines`, by which these checks and the
/// native scorer read, ends one only at an LF (or CR LF), so LightGBM would read two
/// lines where the checks read one. The long pass of `lightgbm_load` found
/// `objective=\rbinary sigmoid:1`: an empty objective to LightGBM (the SIGSEGV the
/// objective check refuses), `\rbinary` to that check. LightGBM writes LF alone.
fn check_line_ends(text: &str) -> Result<(), String> {
    let bytes = text.as_bytes();
    let Some(at) =
        (0..bytes.len()).find(|&i| bytes[i] == b'\r' && bytes.get(i + 1) != Some(&b'\n'))
    else {
        return Ok(());
    };
    let before = &text[..at];
    let line = &before[before.rfind('\n').map_or(0, |n| n + 1)..];
    let key = key_name(line.split_once('=').map_or(line, |(key, _)| key));
    let trees = before.matches("\nTree=").count();
    let place = if before.contains("\nend of trees") {
        "after the trees".to_owned()
    } else if trees == 0 {
        "the header".to_owned()
    } else {
        format!("tree {}", trees - 1)
    };
    Err(format!(
        "{place}: the {key} line has a carriage return at byte {at} that no line feed \
         follows; LightGBM ends a line there, the checks do not"
    ))
}

/// Checks that the header's `tree_sizes` put each tree where its `Tree=` line is. LightGBM
/// reads tree i at the sum of the sizes before it, counted from the first `Tree=` line,
/// and checks only that a line there begins with `Tree=`; the checks above read the trees
/// between the `Tree=` lines. Sizes that disagree make LightGBM read a tree that was not
/// checked, or start one past the end of the text (`check_complete` only bounds their sum
/// by the whole file's length, header included). `sizes` is the header's value for
/// `tree_sizes`, `trees` the text after the first "Tree=", up to "end of trees".
fn check_tree_sizes(sizes: Option<&str>, trees: &str) -> Result<(), String> {
    let Some(sizes) = sizes else {
        // Without sizes LightGBM reads the trees one after another, as the checks do.
        return Ok(());
    };
    // Where each `Tree=` line begins, from the first one's (which `trees` starts inside).
    let starts: Vec<usize> = std::iter::once(0)
        .chain(
            trees
                .match_indices("\nTree=")
                .map(|(at, _)| at + "\nTree=".len()),
        )
        .collect();
    let mut at = 0usize;
    let mut listed = 0;
    for (t, size) in sizes.split(' ').enumerate() {
        if starts.get(t) != Some(&at) {
            return Err(format!(
                "tree_sizes puts tree {t} at byte {at} of the trees, where no Tree= line begins \
                 (the file has {} trees)",
                starts.len()
            ));
        }
        at = size
            .parse::<usize>()
            .ok()
            .and_then(|size| at.checked_add(size))
            .ok_or_else(|| format!("tree_sizes has {size:?}, not a size"))?;
        listed = t + 1;
    }
    if listed != starts.len() {
        return Err(format!(
            "tree_sizes gives {listed} sizes for the file's {} trees",
            starts.len()
        ));
    }
    Ok(())
}

fn check_tree_links(block: &str, max_feature: Option<i64>) -> Result<(), String> {
    // A key given twice is refused, whichever key it is: these checks (and the native
    // scorer) read the first line, LightGBM keeps the last. The fuzz target
    // `lightgbm_load` found a copied fragment that added a second, garbled `left_child`
    // line, and LightGBM looped forever on it; and, in its long pass, a second
    // `decision_type` line whose splits were categorical in a tree with num_cat=0, so
    // LightGBM's TreeSHAP read the tree's absent category bitsets (a SIGSEGV in
    // `Tree::TreeSHAP`).
    check_unique_keys(block)?;
    check_tree_ends(block)?;
    let field = |name: &str| {
        block
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
    };
    // Split as LightGBM splits: on spaces alone. Any other whitespace inside a list
    // (the fuzz target `lightgbm_load` put a form feed between two entries of a
    // `left_child` line) made two entries here and one for LightGBM, whose shorter list it
    // then read past, looping forever in its first prediction.
    let integers = |name: &str| -> Result<Vec<i64>, String> {
        field(name)
            .ok_or_else(|| format!("no {name}"))?
            .trim_end_matches('\r')
            .split(' ')
            .map(|n| {
                n.parse()
                    .map_err(|_| format!("{name} has {n:?}, not an integer"))
            })
            .collect()
    };
    let leaves: usize = field("num_leaves")
        .ok_or("no num_leaves")?
        .trim()
        .parse()
        .map_err(|_| "num_leaves is not a count".to_owned())?;
    // Every tree has a leaf, and a value for each: a tree of `num_leaves=0` has none,
    // and LightGBM read its first value from an empty list (a SIGSEGV, found by the
    // long pass of `lightgbm_load`).
    if leaves == 0 {
        return Err("num_leaves=0: a tree has at least one leaf".into());
    }
    let values = field("leaf_value")
        .ok_or("no leaf_value")?
        .trim_end_matches('\r')
        .split(' ')
        .count();
    if values != leaves {
        return Err(format!(
            "leaf_value has {values} entries for num_leaves={leaves}"
        ));
    }
    if leaves == 1 {
        return Ok(());
    }
    let internal = leaves - 1;
    let (left, right, features) = (
        integers("left_child")?,
        integers("right_child")?,
        integers("split_feature")?,
    );
    for (name, list) in [
        ("left_child", &left),
        ("right_child", &right),
        ("split_feature", &features),
    ] {
        if list.len() != internal {
            return Err(format!(
                "{name} has {} entries for num_leaves={leaves} ({internal} splits)",
                list.len()
            ));
        }
    }
    // A categorical split (bit 0 of decision_type) reads the tree's category bitsets: one
    // in a tree without any (num_cat=0) made LightGBM read past them, a SIGSEGV (the fuzz
    // target `lightgbm_load` turned a `8` into `1e`, which LightGBM reads as 1).
    let kinds = integers("decision_type")?;
    if kinds.len() != internal {
        return Err(format!(
            "decision_type has {} entries for num_leaves={leaves} ({internal} splits)",
            kinds.len()
        ));
    }
    let categories: i64 = match field("num_cat") {
        Some(n) => n
            .trim()
            .parse()
            .map_err(|_| "num_cat is not a count".to_owned())?,
        None => 0,
    };
    for (node, &kind) in kinds.iter().enumerate() {
        if !(0..=255).contains(&kind) {
            return Err(format!(
                "node {node}'s decision_type {kind} is out of range"
            ));
        }
        if kind & 1 == 1 && categories <= 0 {
            return Err(format!(
                "node {node} is a categorical split (decision_type {kind}) in a tree with num_cat={categories}"
            ));
        }
    }
    if let Some(max) = max_feature {
        if let Some((node, f)) = features
            .iter()
            .enumerate()
            .find(|(_, &f)| !(0..=max).contains(&f))
        {
            return Err(format!(
                "node {node} splits on feature {f}; the header's max_feature_idx is {max}"
            ));
        }
    }
    let mut reached = vec![false; internal];
    let mut stack = vec![0usize];
    while let Some(node) = stack.pop() {
        if std::mem::replace(&mut reached[node], true) {
            return Err(format!(
                "node {node} is reached twice: the tree has a cycle"
            ));
        }
        for (side, child) in [("left", left[node]), ("right", right[node])] {
            // A negative child is a leaf, `!child` its index.
            let in_range = if child >= 0 {
                usize::try_from(child).is_ok_and(|c| c < internal)
            } else {
                usize::try_from(!child).is_ok_and(|l| l < leaves)
            };
            if !in_range {
                return Err(format!(
                    "node {node}'s {side} child {child} is out of range for num_leaves={leaves}"
                ));
            }
            if child >= 0 {
                stack.push(child as usize);
            }
        }
    }
    if let Some(node) = reached.iter().position(|r| !r) {
        return Err(format!("node {node} is not reached from the root"));
    }
    Ok(())
}

/// Checks that a tree ends as LightGBM reads it: after its `Tree=` line, LightGBM reads
/// up to 22 lines of `key=value`, stopping at a blank line, and it looks for each `=` and
/// each line's end without looking for the end of the text. Every tree LightGBM writes
/// ends with a blank line; one that runs into the next tree has LightGBM read that
/// tree's keys as its own, and one that runs to the end of the file has it read past the
/// end of its buffer (a SIGSEGV, found by the long pass of `lightgbm_load`: a mutated
/// `leaf_weight` line took in an "end of trees", and the file ended inside the tree).
/// `block` is the tree's text from after "Tree=" to the next tree or "end of trees".
fn check_tree_ends(block: &str) -> Result<(), String> {
    let bytes = block.as_bytes();
    let line_end = |from: usize| {
        bytes[from..]
            .iter()
            .position(|&b| b == b'\r' || b == b'\n')
            .map(|n| from + n)
    };
    let past_newline = |mut at: usize| {
        if bytes.get(at) == Some(&b'\r') {
            at += 1;
        }
        if bytes.get(at) == Some(&b'\n') {
            at += 1;
        }
        at
    };
    let runs_on = |last: &str| {
        Err(format!(
            "no blank line ends the tree after its last line ({last}): LightGBM would read on \
             past it, into what follows or past the end of the file"
        ))
    };
    let mut last = "Tree=".to_owned();
    let Some(end) = line_end(0) else {
        return runs_on(&last);
    };
    let mut at = past_newline(end);
    for _ in 0..22 {
        match bytes.get(at) {
            Some(b'\r' | b'\n') => return Ok(()),
            None => return runs_on(&last),
            Some(_) => {}
        }
        let Some(equals) = bytes[at..].iter().position(|&b| b == b'=').map(|n| at + n) else {
            return runs_on(&key_name(&block[at..]));
        };
        last = key_name(&block[at..equals]);
        let Some(end) = line_end(equals + 1) else {
            return runs_on(&last);
        };
        at = past_newline(end);
    }
    Ok(())
}

/// A key as the error messages show it: a name as it is, anything else (a garbled line
/// can make a long key of anything) quoted and cut.
fn key_name(key: &str) -> String {
    if !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        key.to_owned()
    } else {
        format!("{:?}", key.chars().take(40).collect::<String>())
    }
}

/// Refuses a key given on two lines of a tree's text. LightGBM's tree reader takes a
/// line's key as what comes before its first `=` and keeps the last line of each key;
/// the checks here and the native scorer keep the first, so with two lines each would
/// check or score a different model.
fn check_unique_keys(text: &str) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for key in text.lines().filter_map(|l| Some(l.split_once('=')?.0)) {
        if !seen.insert(key) {
            return Err(format!("{} appears twice", key_name(key)));
        }
    }
    Ok(())
}

/// Runs a `lightgbm3` call, turning a panic into an error. `lightgbm3` panics when
/// LightGBM's error message is not UTF-8, which a malformed model file can cause (LightGBM
/// quotes the offending bytes); a bad file must be refused, not take the caller down.
fn guard<T>(call: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call))
        .map_err(|_| "LightGBM failed with an unreadable error message".to_owned())
}

impl Scorer for LightgbmScorer {
    fn predict(&self, rows: &[f64], n_columns: usize) -> Result<Vec<f64>, ScoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        guard(|| self.booster.0.predict(rows, n_columns as i32, true))
            .map_err(ScoreError::Backend)?
            .map_err(|e| ScoreError::Backend(e.to_string()))
    }

    fn num_features(&self) -> usize {
        self.num_features
    }

    /// Path attribution from the native layout where it holds the model, else
    /// LightGBM's TreeSHAP.
    fn contributions(&self, row: &[f64]) -> Option<Result<Vec<f64>, ScoreError>> {
        if let Some(credits) = self.forest.as_ref().and_then(|f| f.contributions(row)) {
            return Some(Ok(credits));
        }
        let result = guard(|| self.booster.0.predict_contrib(row, row.len() as i32, true))
            .map_err(ScoreError::Backend)
            .and_then(|r| r.map_err(|e| ScoreError::Backend(e.to_string())));
        Some(result)
    }

    /// LightGBM files carry column names. A model trained on unnamed columns has names
    /// `Column_0`, `Column_1` …; those say nothing, so they are not reported.
    fn feature_names(&self) -> Option<Vec<String>> {
        let unnamed = self
            .feature_names
            .iter()
            .enumerate()
            .all(|(i, n)| *n == format!("Column_{i}"));
        (!unnamed).then(|| self.feature_names.clone())
    }

    fn engine(&self) -> String {
        "lightgbm".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped purchase model's text, which the malformed-file tests spoil.
    fn shipped_model() -> String {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        std::fs::read_to_string(dir.join("purchase-sim-3.txt")).unwrap()
    }

    #[test]
    fn a_truncated_model_is_refused_before_lightgbm_reads_it() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let manifest = crate::model::Manifest::parse(
            &std::fs::read_to_string(dir.join("purchase.manifest.toml")).unwrap(),
        )
        .unwrap();
        let text = std::fs::read_to_string(dir.join(&manifest.file)).unwrap();
        assert!(LightgbmScorer::from_text(&text).is_ok());
        // Anywhere before the last tree ends. (A file cut after "end of trees" has lost only
        // its parameters and importances; its trees are whole, and it scores the same.)
        let trees_end = text.find("\nend of trees").unwrap();
        for cut in [text.len() / 3, text.len() / 2, trees_end - 10] {
            let Err(LoadError::Parse(message)) = LightgbmScorer::from_text(&text[..cut]) else {
                panic!("a model cut at {cut} bytes loaded");
            };
            assert!(
                message.contains("incomplete") || message.contains("tree_sizes"),
                "{message}"
            );
        }
        let lying = text.replacen("tree_sizes=", "tree_sizes=99999999 ", 1);
        assert!(
            matches!(LightgbmScorer::from_text(&lying), Err(LoadError::Parse(m)) if m.contains("tree_sizes"))
        );
    }

    /// lightgbm3 hands the text to LightGBM as a C string and panics on a NUL byte; the
    /// guard turned that into "an unreadable error message", which says nothing of the
    /// file. The fuzz target `lightgbm_load` found it; the file must be refused naming
    /// the NUL and where it is.
    #[test]
    fn a_model_with_a_nul_byte_is_refused_naming_it() {
        let text = shipped_model();
        let at = text.find("leaf_value=").unwrap();
        let mut spoiled = text.clone();
        spoiled.replace_range(at..at + 1, "\0");
        match LightgbmScorer::from_text(&spoiled) {
            Err(LoadError::Parse(message)) => assert!(
                message.contains("NUL") && message.contains(&format!("byte {at}")),
                "{message}"
            ),
            other => panic!("{:?}", other.map(|_| ())),
        }
    }

    /// A categorical split in a tree without categories: LightGBM read past the tree's
    /// (absent) category bitsets and the process died with SIGSEGV (found by the fuzz
    /// target `lightgbm_load`, input kept from its long pass). Refused, naming the node.
    #[test]
    fn a_categorical_split_in_a_tree_without_categories_is_refused() {
        let text = shipped_model();
        let line = "decision_type=8 2 2 8 2 10 8 2 2 2 8 10";
        assert!(text.contains(line));
        for (kind, expect) in [
            (
                "1",
                "tree 0: node 0 is a categorical split (decision_type 1) in a tree with num_cat=0",
            ),
            ("1e", "tree 0: decision_type has \"1e\", not an integer"),
        ] {
            let spoiled = text.replacen(line, &line.replacen("=8", &format!("={kind}"), 1), 1);
            match LightgbmScorer::from_text(&spoiled) {
                Err(LoadError::Parse(message)) => assert!(message.contains(expect), "{message}"),
                other => panic!("{kind}: {:?}", other.map(|_| ())),
            }
        }
    }

    /// A tree that gives a key twice: LightGBM read the second, garbled `left_child` line
    /// and looped forever (found by the fuzz target `lightgbm_load` in its long pass).
    /// The file is refused naming the key; the load runs on a thread of its own so that,
    /// without the check, the test fails instead of hanging.
    #[test]
    fn a_tree_that_gives_a_key_twice_is_refused() {
        let text = shipped_model();
        let first = "left_child=1 11 10 4 6 -6 14 15 12 21 20 -1 -8 23 -3 16 25 -17 19 -11 -2 -4 27 24 -9 -5 -14 -12 -18 -15\n";
        assert!(text.contains(first));
        let again = first.replacen("left_child=1 11", "left_child=1 00", 1);
        let mut spoiled = text.replacen(first, &format!("{first}{again}"), 1);
        // Tree 0 grew by the line: its size in the header grows with it.
        let sizes = spoiled
            .lines()
            .find(|l| l.starts_with("tree_sizes="))
            .unwrap()
            .to_owned();
        let (head, rest) = sizes["tree_sizes=".len()..].split_once(' ').unwrap();
        let grown = head.parse::<usize>().unwrap() + again.len();
        spoiled = spoiled.replacen(&sizes, &format!("tree_sizes={grown} {rest}"), 1);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let loaded = LightgbmScorer::from_text(&spoiled).and_then(|l| {
                let n = l.num_features();
                l.predict(&vec![0.0; n], n)
                    .map_err(|e| LoadError::Parse(e.to_string()))
            });
            let _ = tx.send(loaded.map(|_| ()));
        });
        match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(Err(LoadError::Parse(message))) => {
                assert!(
                    message.contains("tree 0: left_child appears twice"),
                    "{message}"
                )
            }
            Ok(other) => panic!("{other:?}"),
            Err(_) => panic!("loading and scoring did not finish in 60 s"),
        }
    }

    /// A valid model of `trees` one-split trees over one feature, its `tree_sizes` as
    /// LightGBM writes them: the smallest text the malformed-file tests spoil.
    fn minimal_model(trees: usize) -> String {
        let tree = |t: usize| {
            format!(
                "Tree={t}\nnum_leaves=2\nnum_cat=0\nsplit_feature=0\nsplit_gain=1\nthreshold=5\n\
                 decision_type=2\nleft_child=-1\nright_child=-2\nleaf_value=-0.5 0.5\n\
                 leaf_weight=1 1\nleaf_count=1 1\ninternal_value=0\ninternal_weight=2\n\
                 internal_count=2\nis_linear=0\nshrinkage=1\n\n\n"
            )
        };
        let trees: Vec<String> = (0..trees).map(tree).collect();
        let sizes: Vec<String> = trees.iter().map(|t| t.len().to_string()).collect();
        let model = format!(
            "tree\nversion=v4\nnum_class=1\nnum_tree_per_iteration=1\nlabel_index=0\n\
             max_feature_idx=0\nobjective=binary sigmoid:1\nfeature_names=x\n\
             feature_infos=[0:10]\ntree_sizes={}\n\n{}end of trees\n",
            sizes.join(" "),
            trees.concat()
        );
        if let Err(e) = LightgbmScorer::from_text(&model) {
            panic!("the minimal model does not load: {e}");
        }
        model
    }

    /// Loads `model` with `from` replaced by `to`, which must be refused with a message
    /// that contains `want`.
    fn assert_refused(model: &str, from: &str, to: &str, want: &str) {
        assert!(model.contains(from), "{from}");
        match LightgbmScorer::from_text(&model.replacen(from, to, 1)) {
            Err(LoadError::Parse(message)) => assert!(message.contains(want), "{message}"),
            other => panic!("{to:?}: {:?}", other.map(|_| ())),
        }
    }

    /// A second `decision_type` line: LightGBM keeps the last line of a key, the checks the
    /// first, so a categorical split (decision_type 1) in a tree with num_cat=0 got past
    /// them, and LightGBM's TreeSHAP read the tree's absent category bitsets (a SIGSEGV in
    /// `Tree::TreeSHAP`, found by the long pass of `lightgbm_load`). Any key given twice,
    /// in a tree or in the header, is refused naming it, even when both lines agree.
    #[test]
    fn a_key_given_twice_is_refused_before_lightgbm_keeps_the_last() {
        let model = minimal_model(1);
        assert_refused(
            &model,
            "decision_type=2\n",
            "decision_type=2\ndecision_type=1\n",
            "tree 0: decision_type appears twice",
        );
        assert_refused(
            &model,
            "max_feature_idx=0\n",
            "max_feature_idx=0\nmax_feature_idx=0\n",
            "the header: max_feature_idx appears twice",
        );
    }

    /// A tree that no blank line ends: LightGBM reads a tree's lines until one, so it read
    /// on past the tree, and past the end of its buffer (a SIGSEGV, found by the long pass
    /// of `lightgbm_load`: a mutated `leaf_weight` line took in an "end of trees", where
    /// the checks took the trees to end, and the file ended inside the tree). Refused,
    /// naming the tree and its last line. Each case reads on into text that still has an
    /// `=` and a blank line, so that without the check LightGBM loads it (the test fails)
    /// rather than reading past the end (the test process dies).
    #[test]
    fn a_tree_that_no_blank_line_ends_is_refused() {
        assert_refused(
            &minimal_model(1),
            "leaf_weight=1 1\n",
            "leaf_weight=1 1\nend of trees07.5\n",
            "tree 0: no blank line ends the tree after its last line (leaf_weight)",
        );
        // The first tree runs into the second (no tree_sizes: LightGBM reads them in turn).
        let two = minimal_model(2);
        let sizes = two.lines().find(|l| l.starts_with("tree_sizes=")).unwrap();
        assert_refused(
            &two.replacen(&format!("{sizes}\n"), "", 1),
            "shrinkage=1\n\n\nTree=1",
            "shrinkage=1\nTree=1",
            "tree 0: no blank line ends the tree after its last line (shrinkage)",
        );
    }

    /// A carriage return that no line feed follows ends a line for LightGBM and not for
    /// the checks: the long pass of `lightgbm_load` found `objective=\rbinary sigmoid:1`,
    /// an empty objective to LightGBM, which read its first word from none (a SIGSEGV in
    /// `ObjectiveFunction::CreateObjectiveFunction`). Refused naming the line, in the
    /// header or a tree. The cases here are ones that LightGBM loads without the check (the
    /// test fails) instead of crashing (the test process dies); CR LF is one line end.
    #[test]
    fn a_carriage_return_without_a_line_feed_is_refused() {
        let model = minimal_model(1);
        assert_refused(
            &model,
            "label_index=0\n",
            "label_index=\r0\n",
            "the header: the label_index line has a carriage return at byte",
        );
        assert_refused(
            &model,
            "leaf_count=1 1\n",
            "leaf_count=1\r1\n",
            "tree 0: the leaf_count line has a carriage return at byte",
        );
        assert!(check_line_ends(&model.replace('\n', "\r\n")).is_ok());
    }

    /// A header key that LightGBM reads where a search for `name=` does not: a bare
    /// `num_class` line is `num_class` with an empty value to LightGBM, which reads it as
    /// 0 and, with no num_tree_per_iteration, divides by it (a SIGFPE in
    /// `GBDT::LoadModelFromString`, found by the long pass of `lightgbm_load`); and
    /// `=num_class=1` is a second `num_class`. Refused naming the key. The cases here are
    /// ones LightGBM loads without the checks (the test fails) instead of crashing.
    #[test]
    fn a_header_key_is_checked_as_lightgbm_reads_it() {
        let model = minimal_model(1);
        assert_refused(
            &model,
            "max_feature_idx=0\n",
            "max_feature_idx\n",
            "max_feature_idx= is not a whole number from 0 to",
        );
        assert_refused(
            &model,
            "num_class=1\n",
            "num_class=1\n=num_class=1\n",
            "the header: num_class appears twice",
        );
    }

    /// `tree_sizes` that do not put each tree at its `Tree=` line: LightGBM reads tree i
    /// where the sizes before it add up to, a tree the checks have not read, or past the
    /// end of the text. Refused naming the tree.
    #[test]
    fn tree_sizes_that_miss_the_trees_are_refused() {
        let two = minimal_model(2);
        let sizes = two.lines().find(|l| l.starts_with("tree_sizes=")).unwrap();
        let (first, second) = sizes["tree_sizes=".len()..].split_once(' ').unwrap();
        let first: usize = first.parse().unwrap();
        for (to, want) in [
            (
                format!("tree_sizes={} {second}", first - 1),
                format!("tree_sizes puts tree 1 at byte {}", first - 1),
            ),
            (
                format!("tree_sizes={first} {second} 0"),
                "tree_sizes puts tree 2 at byte".to_owned(),
            ),
            (
                format!("tree_sizes={first}"),
                "tree_sizes gives 1 sizes for the file's 2 trees".to_owned(),
            ),
        ] {
            assert_refused(&two, sizes, &to, &want);
        }
    }

    /// A header count LightGBM reads into an `int` without checking: the fuzz target
    /// `lightgbm_load` found `num_tree_per_iteration=18446744073709551616`, which LightGBM
    /// wraps to 0 and then divides by (SIGFPE, the process dies). Each such count must be
    /// a whole number from 1 to 2^31 - 1 (max_feature_idx from 0 to 65,535), or the file
    /// is refused naming it.
    #[test]
    fn a_model_whose_header_counts_are_out_of_range_is_refused() {
        let text = shipped_model();
        for (from, to) in [
            (
                "num_tree_per_iteration=1\n",
                "num_tree_per_iteration=18446744073709551616\n",
            ),
            ("num_tree_per_iteration=1\n", "num_tree_per_iteration=0\n"),
            ("num_class=1\n", "num_class=4294967297\n"),
            ("max_feature_idx=36\n", "max_feature_idx=-1\n"),
            // Found by the long pass of `lightgbm_load`: with `num_class=1`, LightGBM
            // wrote past a buffer (glibc's malloc check: "free(): invalid pointer").
            ("num_tree_per_iteration=1\n", "num_tree_per_iteration=2\n"),
            ("num_class=1\n", "num_class=3\n"),
            // Found by the long pass of `lightgbm_load`: LightGBM read the first word of
            // an empty objective, a SIGSEGV.
            ("objective=binary sigmoid:1\n", "objective=\n"),
        ] {
            assert!(text.contains(from), "{from}");
            let key = to.split('=').next().unwrap();
            match LightgbmScorer::from_text(&text.replacen(from, to, 1)) {
                Err(LoadError::Parse(message)) => assert!(message.contains(key), "{to}: {message}"),
                other => panic!("{to}: {:?}", other.map(|_| ())),
            }
        }
    }

    /// A child that points back up its tree: LightGBM 4.7 loads such a file and then loops
    /// forever in its first prediction (the fuzz target `lightgbm_load` found it, from a
    /// shipped model whose `left_child` line held a stray token that LightGBM reads as 0,
    /// the root). The load must refuse it, naming the tree and the node. The load runs on
    /// a thread of its own so that, without the check, the test fails instead of hanging.
    #[test]
    fn a_model_whose_tree_loops_is_refused_before_lightgbm_walks_it() {
        let text = shipped_model();
        // Each edit keeps the file's length, so the header's tree_sizes still hold.
        let cases = [
            // Node 1's left child becomes the root.
            (
                "left_child=1 11 ",
                "left_child=1 00 ",
                "tree 0: node 0 is reached twice",
            ),
            // A child past the tree's nodes, and a leaf past its leaves.
            (
                "left_child=1 11 ",
                "left_child=1 99 ",
                "tree 0: node 1's left child 99",
            ),
            (
                "16 25 -17 19",
                "16 25 -99 19",
                "tree 0: node 17's left child -99",
            ),
            // A feature past the header's max_feature_idx (36).
            (
                "split_feature=9 7 27 ",
                "split_feature=9 7 37 ",
                "tree 0: node 2 splits on feature 37",
            ),
            // A tree without leaves (found by the long pass of `lightgbm_load`): LightGBM
            // read the first of no leaf values, a SIGSEGV. And values short of the leaves.
            ("num_leaves=31\n", "num_leaves=0\n", "tree 0: num_leaves=0"),
            (
                "\nleaf_value=-1.0339847841390348 ",
                "\nleaf_value=",
                "tree 0: leaf_value has 30 entries for num_leaves=31",
            ),
            // A form feed instead of a space (found by the long pass of `lightgbm_load`):
            // one entry fewer for LightGBM, which looped forever on the shorter list.
            (
                "-5 -14 -12 -18",
                "-5 -14\x0c-12 -18",
                "left_child has \"-14\\u{c}-12\", not an integer",
            ),
        ];
        let mut wrong = Vec::new();
        for (from, to, want) in cases {
            assert!(text.contains(from), "{from}");
            let spoiled = text.replacen(from, to, 1);
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let loaded = LightgbmScorer::from_text(&spoiled).and_then(|l| {
                    let n = l.num_features();
                    l.predict(&vec![0.0; n], n)
                        .map_err(|e| LoadError::Parse(e.to_string()))
                });
                let _ = tx.send(loaded.map(|_| ()));
            });
            match rx.recv_timeout(std::time::Duration::from_secs(60)) {
                Ok(Err(LoadError::Parse(message))) if message.contains(want) => {}
                Ok(other) => wrong.push(format!("{to}: {other:?}")),
                Err(_) => wrong.push(format!("{to}: loading and scoring did not finish in 60 s")),
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }
}
