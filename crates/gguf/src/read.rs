use std::io::{BufReader, Read};
use std::path::Path;

use crate::{DEFAULT_ALIGNMENT, GgufError, MAGIC, Value, ValueType};

/// Files come from outside the process: every count and length is capped before anything is
/// allocated for it, so a corrupt or hostile header fails cleanly instead of exhausting memory.
const MAX_STRING: u64 = 16 << 20;
const MAX_ARRAY: u64 = 16 << 20;
const MAX_KV: u64 = 1 << 16;
const MAX_TENSORS: u64 = 1 << 20;
const MAX_DIMS: u32 = 8;

#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    /// ggml type code (0 = F32, 1 = F16, …).
    pub ggml_type: u32,
    /// From the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn element_count(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes this tensor occupies, or None for a type this reader does not know.
    pub fn byte_size(&self) -> Option<u64> {
        let (block, bytes) = ggml_block(self.ggml_type)?;
        Some(self.element_count().div_ceil(block) * bytes)
    }
}

/// (elements per block, bytes per block) of the ggml types GGUF files commonly use.
fn ggml_block(code: u32) -> Option<(u64, u64)> {
    Some(match code {
        0 => (1, 4),      // F32
        1 => (1, 2),      // F16
        2 => (32, 18),    // Q4_0
        3 => (32, 20),    // Q4_1
        6 => (32, 22),    // Q5_0
        7 => (32, 24),    // Q5_1
        8 => (32, 34),    // Q8_0
        10 => (256, 84),  // Q2_K
        11 => (256, 110), // Q3_K
        12 => (256, 144), // Q4_K
        13 => (256, 176), // Q5_K
        14 => (256, 210), // Q6_K
        15 => (256, 292), // Q8_K
        30 => (1, 2),     // BF16
        _ => return None,
    })
}

#[derive(Debug, Clone, PartialEq)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    /// Absolute file offset where tensor data begins.
    pub data_offset: u64,
}

impl GgufHeader {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }

    /// `{arch}.{suffix}` as an integer, e.g. `arch_u64("block_count")`.
    pub fn arch_u64(&self, suffix: &str) -> Option<u64> {
        let arch = self.architecture()?;
        self.get(&format!("{arch}.{suffix}")).and_then(Value::as_u64)
    }

    /// Total bytes of tensor data, when every tensor type is known.
    pub fn tensor_bytes(&self) -> Option<u64> {
        self.tensors.iter().map(TensorInfo::byte_size).sum()
    }

    /// Where the data section must end for the file to hold every tensor.
    pub fn required_file_size(&self) -> Option<u64> {
        self.tensors
            .iter()
            .map(|t| t.byte_size().map(|size| self.data_offset + t.offset + size))
            .try_fold(self.data_offset, |end, t| t.map(|t| end.max(t)))
    }
}

/// Reads the header of the GGUF file at `path` (not the tensor data).
pub fn read_header(path: &Path) -> Result<GgufHeader, GgufError> {
    let file =
        std::fs::File::open(path).map_err(|source| GgufError::Io { path: path.display().to_string(), source })?;
    parse_header(BufReader::new(file))
}

/// Reads a GGUF header from any byte source.
pub fn parse_header(reader: impl Read) -> Result<GgufHeader, GgufError> {
    let mut r = Reader { inner: reader, offset: 0 };
    let magic = r.u32("magic")?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = r.u32("version")?;
    if !(1..=3).contains(&version) {
        return Err(GgufError::Version(version));
    }
    let tensor_count = capped(r.u64("tensor count")?, MAX_TENSORS, "tensor count")?;
    let kv_count = capped(r.u64("metadata count")?, MAX_KV, "metadata count")?;

    let mut metadata = Vec::with_capacity(kv_count as usize);
    for _ in 0..kv_count {
        let key = r.string("metadata key")?;
        let code = r.u32("value type")?;
        let ty = ValueType::from_code(code).ok_or(GgufError::UnknownType(code))?;
        let value = r.value(ty)?;
        metadata.push((key, value));
    }
    let mut tensors = Vec::with_capacity(tensor_count as usize);
    for _ in 0..tensor_count {
        let name = r.string("tensor name")?;
        let n_dims = r.u32("tensor dimensions")?;
        if n_dims > MAX_DIMS {
            return Err(GgufError::Implausible {
                what: "tensor dimensions",
                value: n_dims.into(),
                limit: MAX_DIMS.into(),
            });
        }
        let dims = (0..n_dims).map(|_| r.u64("tensor shape")).collect::<Result<Vec<_>, _>>()?;
        let ggml_type = r.u32("tensor type")?;
        let offset = r.u64("tensor offset")?;
        tensors.push(TensorInfo { name, dims, ggml_type, offset });
    }
    let alignment = metadata
        .iter()
        .find(|(k, _)| k == "general.alignment")
        .and_then(|(_, v)| v.as_u64())
        .filter(|a| *a > 0)
        .unwrap_or(DEFAULT_ALIGNMENT);
    let data_offset = r.offset.div_ceil(alignment) * alignment;
    Ok(GgufHeader { version, metadata, tensors, data_offset })
}

fn capped(value: u64, limit: u64, what: &'static str) -> Result<u64, GgufError> {
    if value > limit { Err(GgufError::Implausible { what, value, limit }) } else { Ok(value) }
}

struct Reader<R> {
    inner: R,
    offset: u64,
}

impl<R: Read> Reader<R> {
    fn bytes<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let mut buf = [0u8; N];
        self.inner.read_exact(&mut buf).map_err(|_| GgufError::Truncated { offset: self.offset, what })?;
        self.offset += N as u64;
        Ok(buf)
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        self.bytes(what).map(u32::from_le_bytes)
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        self.bytes(what).map(u64::from_le_bytes)
    }
    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let len = capped(self.u64(what)?, MAX_STRING, what)?;
        let mut buf = Vec::with_capacity(len as usize);
        (&mut self.inner)
            .take(len)
            .read_to_end(&mut buf)
            .map_err(|_| GgufError::Truncated { offset: self.offset, what })?;
        if buf.len() as u64 != len {
            return Err(GgufError::Truncated { offset: self.offset + buf.len() as u64, what });
        }
        self.offset += len;
        String::from_utf8(buf).map_err(|e| GgufError::Utf8 { key: String::from_utf8_lossy(e.as_bytes()).into_owned() })
    }
    fn value(&mut self, ty: ValueType) -> Result<Value, GgufError> {
        const W: &str = "metadata value";
        Ok(match ty {
            ValueType::U8 => Value::U8(self.bytes::<1>(W)?[0]),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.bytes(W)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.bytes(W)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.bytes(W)?)),
            ValueType::U32 => Value::U32(self.u32(W)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.bytes(W)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.bytes(W)?)),
            ValueType::Bool => Value::Bool(self.bytes::<1>(W)?[0] != 0),
            ValueType::String => Value::String(self.string(W)?),
            ValueType::U64 => Value::U64(self.u64(W)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.bytes(W)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.bytes(W)?)),
            ValueType::Array => {
                let code = self.u32("array item type")?;
                let item = ValueType::from_code(code).ok_or(GgufError::UnknownType(code))?;
                let len = capped(self.u64("array length")?, MAX_ARRAY, "array length")?;
                // Grow as items arrive: the length is only a claim until they do.
                let mut items = Vec::new();
                for _ in 0..len {
                    items.push(self.value(item)?);
                }
                Value::Array(item, items)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_wrong_magic_and_truncation_with_offsets() {
        let err = parse_header(&b"GGML\x03\0\0\0"[..]).unwrap_err();
        assert!(matches!(err, GgufError::BadMagic { .. }), "{err}");
        let err = parse_header(&b"GGUF\x03\0\0\0\x01\0"[..]).unwrap_err();
        assert!(matches!(err, GgufError::Truncated { offset: 8, what: "tensor count" }), "{err}");
    }

    #[test]
    fn huge_claimed_lengths_fail_without_allocating() {
        let mut bytes = b"GGUF\x03\0\0\0".to_vec();
        bytes.extend(0u64.to_le_bytes());
        bytes.extend(1u64.to_le_bytes());
        bytes.extend(u64::MAX.to_le_bytes()); // key length
        let err = parse_header(&bytes[..]).unwrap_err();
        assert!(matches!(err, GgufError::Implausible { what: "metadata key", .. }), "{err}");
    }
}
