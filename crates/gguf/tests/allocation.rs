//! What reading a hostile header costs in memory, counted by the allocator itself. This binary
//! holds one test on purpose: the counts are process-wide, and a second test running beside it
//! would add its own allocations.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test states its assumptions by panicking

mod support;

use std::io::Write;
use std::mem::size_of;

use metalkube_gguf::{Value, parse_header, read_header};
use proptest::prelude::*;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use support::hostile_header;

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// Every byte of header may become at most one `Value` (a one-byte array item takes a 32-byte
/// `Value` in memory), and a vector that grows as items arrive may hold twice what it uses.
const BYTES_PER_FILE_BYTE: usize = 2 * size_of::<Value>();
/// The file reader's buffer and small fixed costs.
const FIXED: usize = 16 << 10;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Counts and lengths are claims: a header that says "2^63 strings follow" in 40 bytes
    /// must cost memory in proportion to its 40 bytes, not its claim. Bytes allocated (a sum
    /// over the whole parse, so an upper bound of the peak) stay within a fixed multiple of
    /// the bytes present, through both ways in.
    #[test]
    fn reading_allocates_in_proportion_to_the_bytes_present_never_to_the_counts_claimed(h in hostile_header()) {
        let bytes = h.to_bytes();
        let bound = BYTES_PER_FILE_BYTE * bytes.len() + FIXED;

        let region = Region::new(GLOBAL);
        let streamed = parse_header(&bytes[..]);
        let allocated = region.change().bytes_allocated;
        drop(streamed);
        prop_assert!(allocated <= bound, "stream: {allocated} bytes allocated for {} bytes of header", bytes.len());

        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&bytes).unwrap();
        let region = Region::new(GLOBAL);
        let from_file = read_header(file.path());
        let allocated = region.change().bytes_allocated;
        drop(from_file);
        prop_assert!(allocated <= bound, "file: {allocated} bytes allocated for {} bytes of header", bytes.len());
    }
}
