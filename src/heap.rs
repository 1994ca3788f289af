//! How many bytes a value holds on the heap, as the engine's cache counts them against its
//! budget. An estimate from the buffers' capacities and glibc's chunk sizes ([`allocation`]);
//! the ingest benchmark checks it against resident memory.

use std::mem::size_of;

/// What glibc's malloc (64-bit) takes for a request of `bytes`: the request and the
/// chunk's 8-byte size field, rounded up to 16, and never less than its 32-byte minimum
/// chunk. A 7-byte product id takes 32 bytes, an 88-byte session 96.
pub const fn allocation(bytes: usize) -> usize {
    if bytes == 0 {
        return 0;
    }
    let chunk = (bytes + 8 + 15) & !15;
    if chunk < 32 {
        32
    } else {
        chunk
    }
}

/// Bytes held on the heap by a value, not counting the value itself.
pub trait HeapSize {
    fn heap_bytes(&self) -> usize;
}

/// The bytes of one heap buffer of `capacity` elements of `T` (none when empty).
pub fn buffer<T>(capacity: usize) -> usize {
    allocation(capacity * size_of::<T>())
}

impl HeapSize for String {
    fn heap_bytes(&self) -> usize {
        buffer::<u8>(self.capacity())
    }
}

impl<T: HeapSize> HeapSize for Vec<T> {
    fn heap_bytes(&self) -> usize {
        buffer::<T>(self.capacity()) + self.iter().map(HeapSize::heap_bytes).sum::<usize>()
    }
}

impl<T: HeapSize> HeapSize for Option<T> {
    fn heap_bytes(&self) -> usize {
        self.as_ref().map_or(0, HeapSize::heap_bytes)
    }
}

impl<A: HeapSize, B: HeapSize> HeapSize for (A, B) {
    fn heap_bytes(&self) -> usize {
        self.0.heap_bytes() + self.1.heap_bytes()
    }
}

/// Plain values that own nothing on the heap.
macro_rules! inline {
    ($($t:ty),*) => { $(impl HeapSize for $t { fn heap_bytes(&self) -> usize { 0 } })* };
}
inline!(u32, u64, i32, i64, f64, bool);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_capacity_and_what_the_elements_own() {
        assert_eq!(Vec::<u64>::new().heap_bytes(), 0);
        let v: Vec<u64> = Vec::with_capacity(4);
        assert_eq!(
            v.heap_bytes(),
            48,
            "32 bytes and the size field, rounded to 16"
        );
        let s = String::from("abc");
        let strings = vec![s.clone()];
        assert_eq!(
            strings.heap_bytes(),
            32 + 32,
            "both under the 32-byte minimum chunk"
        );
    }

    #[test]
    fn allocation_follows_glibcs_chunk_sizes() {
        assert_eq!(allocation(0), 0);
        assert_eq!(allocation(1), 32);
        assert_eq!(allocation(24), 32);
        assert_eq!(allocation(25), 48);
        assert_eq!(allocation(88), 96);
        assert_eq!(allocation(1000), 1008);
    }
}
