//! How many bytes a value holds on the heap, as the engine's cache counts them against its
//! budget. An estimate from the buffers' capacities, plus what a general-purpose allocator
//! spends per allocation; the ingest benchmark checks it against resident memory.

use std::mem::size_of;

/// What glibc's malloc spends per allocation beyond the bytes asked for (a chunk header
/// and rounding to 16 bytes), on average.
pub const ALLOCATION_OVERHEAD: usize = 16;

/// Bytes held on the heap by a value, not counting the value itself.
pub trait HeapSize {
    fn heap_bytes(&self) -> usize;
}

/// The bytes of one heap buffer of `capacity` elements of `T` (none when empty).
pub fn buffer<T>(capacity: usize) -> usize {
    match capacity * size_of::<T>() {
        0 => 0,
        bytes => bytes + ALLOCATION_OVERHEAD,
    }
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
        assert_eq!(v.heap_bytes(), 32 + ALLOCATION_OVERHEAD);
        let s = String::from("abc");
        let strings = vec![s.clone()];
        assert_eq!(
            strings.heap_bytes(),
            size_of::<String>() + ALLOCATION_OVERHEAD + s.capacity() + ALLOCATION_OVERHEAD
        );
    }
}
