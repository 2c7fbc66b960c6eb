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
    #[error("not a GGUF file (magic {found:#010x}, expected {MAGIC:#010x})")]
    BadMagic { found: u32 },
    #[error("GGUF version {0} is not supported (1 to 3 are)")]
    Version(u32),
    #[error("file ends inside the header at byte {offset} while reading {what}")]
    Truncated { offset: u64, what: &'static str },
    #[error("header field {what} is implausible: {value} (limit {limit})")]
    Implausible { what: &'static str, value: u64, limit: u64 },
    #[error("unknown metadata value type {0}")]
    UnknownType(u32),
    #[error("metadata key {key:?} is not valid UTF-8")]
    Utf8 { key: String },
    #[error("tensor data of {name} has {got} values, its shape needs {want}")]
    TensorSize { name: String, got: usize, want: usize },
}
