//! Just enough GGUF for metalkube: read a file's header (architecture, sizes, tensor table) to
//! estimate what serving it costs, and write small F32 models for tests.

mod estimate;
mod read;
mod tiny;
mod value;
mod write;

pub use estimate::{MemoryEstimate, estimate_memory};
pub use read::{GgufHeader, TensorInfo, parse_header, read_header};
pub use tiny::{TINY_MODEL_VERSION, TinyModel, write_tiny_model};
pub use value::{Value, ValueType};
pub use write::GgufWriter;

/// `GGUF` in little-endian.
pub const MAGIC: u32 = 0x4655_4747;
pub const DEFAULT_ALIGNMENT: u64 = 32;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("reading {what} at byte {offset}: {source}")]
    Read {
        offset: u64,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Nothing of what the file holds instead is said: the path may name any file on the host
    /// (a symlink to /etc/shadow showed its first four bytes, "root").
    #[error("not a GGUF file (no GGUF magic)")]
    BadMagic,
    #[error("GGUF version {0} is not supported (2 and 3 are{hint})", hint = version_hint(*.0))]
    Version(u32),
    #[error("file ends inside the header at byte {offset} while reading {what}")]
    Truncated { offset: u64, what: &'static str },
    /// A count or length that the rest of the file cannot hold; refused before anything is
    /// allocated for it.
    #[error("{what} at byte {offset} needs at least {needed} bytes, but the file has {remaining} left")]
    Overclaimed { what: &'static str, offset: u64, needed: u64, remaining: u64 },
    #[error("header field {what} is implausible: {value} (limit {limit})")]
    Implausible { what: &'static str, value: u64, limit: u64 },
    #[error("the header would take more than {limit} bytes of memory (at byte {offset})")]
    TooLarge { offset: u64, limit: u64 },
    #[error("unknown metadata value type {0}")]
    UnknownType(u32),
    #[error("{what} at byte {offset} is not valid UTF-8: {lossy:?}")]
    Utf8 {
        what: &'static str,
        offset: u64,
        /// The start of the text, invalid bytes replaced.
        lossy: String,
        #[source]
        source: std::str::Utf8Error,
    },
    #[error("general.alignment is {0}; it must be a power of two")]
    Alignment(String),
    #[error("tensor data of {name} has {got} values, its shape needs {want}")]
    TensorSize { name: String, got: usize, want: u64 },
}

fn version_hint(version: u32) -> &'static str {
    match version {
        1 => "; version 1 used 32-bit lengths and is obsolete",
        // 3 read with the wrong byte order is 0x03000000.
        v if v & 0xffff == 0 && v != 0 => "; this looks like a big-endian file",
        _ => "",
    }
}
