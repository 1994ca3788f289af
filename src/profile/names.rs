//! Category names, shared by everyone who holds them.
//!
//! A catalog has a few hundred categories and a site millions of people, each holding up
//! to 16 categories and 8 products' categories: held as copies, the names were a tenth of
//! a cached person. A [`Category`] is a pointer to one copy per process instead.
//!
//! The table of shared names is bounded ([`MAX_SHARED`]): a sender that makes up a new
//! category per event fills it and then gets names of its own, allocated per holder and
//! weighed so ([`HeapSize`]), so the cache's budget still holds.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::sync::{Arc, LazyLock, Mutex};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::heap::{self, HeapSize};

/// Names shared at most; beyond them a name is its holder's own.
pub const MAX_SHARED: usize = 16_384;

/// The shared names. A `Mutex` and not a sharded map: it is taken once per event that
/// names a category, for a hash lookup.
static SHARED: LazyLock<Mutex<HashSet<Arc<str>>>> = LazyLock::new(Default::default);

/// A category name. Compared, ordered and hashed as its string.
#[derive(Clone)]
pub struct Category(Name);

#[derive(Clone)]
enum Name {
    /// In [`SHARED`]: costs its holder nothing on the heap.
    Shared(Arc<str>),
    /// The table was full.
    Own(Box<str>),
}

impl Category {
    /// The shared copy of `name` (made if there is room).
    pub fn new(name: &str) -> Category {
        let mut shared = SHARED
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(found) = shared.get(name) {
            return Category(Name::Shared(found.clone()));
        }
        if shared.len() < MAX_SHARED {
            let name: Arc<str> = Arc::from(name);
            shared.insert(name.clone());
            return Category(Name::Shared(name));
        }
        Category(Name::Own(name.into()))
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            Name::Shared(name) => name,
            Name::Own(name) => name,
        }
    }
}

impl std::ops::Deref for Category {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for Category {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for Category {
    fn eq(&self, other: &Category) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Category {}

impl PartialEq<str> for Category {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialOrd for Category {
    fn partial_cmp(&self, other: &Category) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Category {
    fn cmp(&self, other: &Category) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl std::hash::Hash for Category {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl std::fmt::Debug for Category {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

impl HeapSize for Category {
    fn heap_bytes(&self) -> usize {
        match &self.0 {
            Name::Shared(_) => 0,
            Name::Own(name) => heap::allocation(name.len()),
        }
    }
}

/// Stored as the string it is.
impl Serialize for Category {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Category {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Category, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(Category::new(&name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_shared_and_reads_and_stores_as_its_string() {
        let a = Category::new("names-test-outdoor");
        let b = Category::new("names-test-outdoor");
        match (&a.0, &b.0) {
            (Name::Shared(x), Name::Shared(y)) => assert!(Arc::ptr_eq(x, y)),
            _ => panic!("a name is shared while the table has room"),
        }
        assert_eq!(a.heap_bytes(), 0);
        assert_eq!(&*a, "names-test-outdoor");
        let bytes = postcard::to_allocvec(&a).unwrap();
        assert_eq!(bytes, postcard::to_allocvec("names-test-outdoor").unwrap());
        assert_eq!(postcard::from_bytes::<Category>(&bytes).unwrap(), a);
    }

    #[test]
    fn an_own_name_is_weighed_as_its_allocation() {
        let own = Category(Name::Own("made-up-per-event".into()));
        assert_eq!(
            own.heap_bytes(),
            heap::allocation("made-up-per-event".len())
        );
        // Equal to the shared one of the same text: where it lives is not what it is.
        assert_eq!(own, Category::new("made-up-per-event"));
    }
}
