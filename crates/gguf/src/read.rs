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
/// llama.cpp refuses nested arrays altogether; the format allows them, so a few levels are
/// read, but never deep enough for the recursion to threaten the stack.
const MAX_NESTING: u32 = 8;
/// What the parsed header may occupy in memory. Real headers take tens of MiB at most (a
/// 256k-token vocabulary with scores and merges); a file may be far larger than its header,
/// so its size alone does not bound what a hostile header makes us allocate.
const MAX_HEADER_MEMORY: u64 = 256 << 20;
/// Smallest a metadata entry can be in the file: key length, value type, a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest a tensor entry can be: name length, dimension count, type, offset.
const MIN_TENSOR_BYTES: u64 = 8 + 4 + 4 + 8;

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
    /// The product of the dimensions, or None when it does not fit in 64 bits (the shape comes
    /// from the file).
    pub fn element_count(&self) -> Option<u64> {
        exact_product(self.dims.iter().copied())
    }

    /// Bytes this tensor occupies, or None for a type this reader does not know or a size
    /// beyond 64 bits.
    pub fn byte_size(&self) -> Option<u64> {
        let (block, bytes) = ggml_block(self.ggml_type)?;
        self.element_count()?.div_ceil(block).checked_mul(bytes)
    }
}

/// The product of `factors`, or None when it does not fit in 64 bits. A zero factor makes it
/// zero whatever the others are, even when a partial product before it would overflow.
pub(crate) fn exact_product(mut factors: impl Iterator<Item = u64> + Clone) -> Option<u64> {
    if factors.clone().any(|f| f == 0) {
        return Some(0);
    }
    factors.try_fold(1u64, u64::checked_mul)
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

    /// Total bytes of tensor data, when every tensor type is known and the sum fits in 64 bits.
    pub fn tensor_bytes(&self) -> Option<u64> {
        self.tensors.iter().try_fold(0u64, |sum, t| sum.checked_add(t.byte_size()?))
    }

    /// Where the data section must end for the file to hold every tensor (None as for
    /// `tensor_bytes`, or when an offset from the file points beyond 64 bits).
    pub fn required_file_size(&self) -> Option<u64> {
        self.tensors.iter().try_fold(self.data_offset, |end, t| {
            let tensor_end = self.data_offset.checked_add(t.offset)?.checked_add(t.byte_size()?)?;
            Some(end.max(tensor_end))
        })
    }
}

/// Reads the header of the GGUF file at `path` (not the tensor data). The file's length is
/// known here, so a count or length that claims more than the rest of the file could hold is
/// refused before it is read.
pub fn read_header(path: &Path) -> Result<GgufHeader, GgufError> {
    let io = |source| GgufError::Io { path: path.display().to_string(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    parse(BufReader::new(file), Some(len), MAX_HEADER_MEMORY)
}

/// Reads a GGUF header from any byte source. Its length is unknown, so counts are believed
/// only as far as the items they announce arrive: nothing is reserved for them in advance.
pub fn parse_header(reader: impl Read) -> Result<GgufHeader, GgufError> {
    parse(reader, None, MAX_HEADER_MEMORY)
}

/// `len`: the source's total length, when known. `memory_limit`: what the parsed header may
/// occupy (a parameter so tests can reach it with small inputs).
pub(crate) fn parse(reader: impl Read, len: Option<u64>, memory_limit: u64) -> Result<GgufHeader, GgufError> {
    let mut r = Reader { inner: reader, offset: 0, len, memory: 0, memory_limit, depth: 0 };
    if r.u32("magic")? != MAGIC {
        return Err(GgufError::BadMagic);
    }
    let version = r.u32("version")?;
    // Version 1 had 32-bit counts and lengths; llama.cpp no longer reads it either.
    if !(2..=3).contains(&version) {
        return Err(GgufError::Version(version));
    }
    let tensor_count = capped(r.u64("tensor count")?, MAX_TENSORS, "tensor count")?;
    let kv_count = capped(r.u64("metadata count")?, MAX_KV, "metadata count")?;
    // Both tables follow: together they must fit in what is left.
    let table_bytes = tensor_count * MIN_TENSOR_BYTES + kv_count * MIN_KV_BYTES;
    r.fits("tensor and metadata tables", table_bytes)?;

    let mut metadata = Vec::with_capacity(r.capacity_for::<(String, Value)>(kv_count, MIN_KV_BYTES));
    for _ in 0..kv_count {
        r.charge(size_of::<(String, Value)>())?;
        let key = r.string("metadata key")?;
        let code = r.u32("value type")?;
        let ty = ValueType::from_code(code).ok_or(GgufError::UnknownType(code))?;
        let value = r.value(ty)?;
        metadata.push((key, value));
    }
    let mut tensors = Vec::with_capacity(r.capacity_for::<TensorInfo>(tensor_count, MIN_TENSOR_BYTES));
    for _ in 0..tensor_count {
        r.charge(size_of::<TensorInfo>())?;
        let name = r.string("tensor name")?;
        let n_dims = r.u32("tensor dimensions")?;
        if n_dims > MAX_DIMS {
            return Err(GgufError::Implausible {
                what: "tensor dimensions",
                value: n_dims.into(),
                limit: MAX_DIMS.into(),
            });
        }
        r.charge(n_dims as usize * size_of::<u64>())?;
        let dims = (0..n_dims).map(|_| r.u64("tensor shape")).collect::<Result<Vec<_>, _>>()?;
        let ggml_type = r.u32("tensor type")?;
        let offset = r.u64("tensor offset")?;
        tensors.push(TensorInfo { name, dims, ggml_type, offset });
    }
    let alignment = alignment(&metadata)?;
    let data_offset = r.offset.div_ceil(alignment).saturating_mul(alignment);
    Ok(GgufHeader { version, metadata, tensors, data_offset })
}

/// `general.alignment`, when present, must be a power of two (llama.cpp refuses the file too).
fn alignment(metadata: &[(String, Value)]) -> Result<u64, GgufError> {
    let Some((_, value)) = metadata.iter().find(|(k, _)| k == "general.alignment") else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    match value.as_u64() {
        Some(a) if a.is_power_of_two() => Ok(a),
        _ => Err(GgufError::Alignment(format!("{value:?}").chars().take(64).collect())),
    }
}

fn capped(value: u64, limit: u64, what: &'static str) -> Result<u64, GgufError> {
    if value > limit { Err(GgufError::Implausible { what, value, limit }) } else { Ok(value) }
}

struct Reader<R> {
    inner: R,
    offset: u64,
    /// The source's total length, when known.
    len: Option<u64>,
    /// What the header parsed so far occupies in memory, roughly: the slots of its vectors and
    /// the bytes of its strings.
    memory: u64,
    memory_limit: u64,
    /// Arrays being read, one inside the other.
    depth: u32,
}

impl<R: Read> Reader<R> {
    fn remaining(&self) -> Option<u64> {
        self.len.map(|len| len.saturating_sub(self.offset))
    }

    /// Refuses a claim of `needed` more bytes that the rest of a source of known length cannot
    /// hold.
    fn fits(&self, what: &'static str, needed: u64) -> Result<(), GgufError> {
        match self.remaining() {
            Some(remaining) if needed > remaining => {
                Err(GgufError::Overclaimed { what, offset: self.offset, needed, remaining })
            }
            _ => Ok(()),
        }
    }

    /// Slots to reserve for `count` items of at least `min_bytes` each in the file: never more
    /// than the rest of the file could hold nor more than the memory budget allows, and none
    /// when the length is unknown (then the items are counted as they arrive).
    fn capacity_for<T>(&self, count: u64, min_bytes: u64) -> usize {
        let Some(remaining) = self.remaining() else { return 0 };
        let budget = self.memory_limit.saturating_sub(self.memory) / (size_of::<T>() as u64).max(1);
        count.min(remaining / min_bytes).min(budget) as usize
    }

    /// Counts `bytes` of memory against the budget before they are allocated.
    fn charge(&mut self, bytes: usize) -> Result<(), GgufError> {
        self.memory = self.memory.saturating_add(bytes as u64);
        if self.memory > self.memory_limit {
            return Err(GgufError::TooLarge { offset: self.offset, limit: self.memory_limit });
        }
        Ok(())
    }

    fn read_error(&self, what: &'static str, source: std::io::Error) -> GgufError {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            GgufError::Truncated { offset: self.offset, what }
        } else {
            GgufError::Read { offset: self.offset, what, source }
        }
    }

    fn bytes<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let mut buf = [0u8; N];
        self.inner.read_exact(&mut buf).map_err(|e| self.read_error(what, e))?;
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
        self.fits(what, len)?;
        self.charge(len as usize)?;
        let start = self.offset;
        // With the length unknown, the claim is believed only as its bytes arrive.
        let mut buf = Vec::with_capacity(if self.len.is_some() { len as usize } else { 0 });
        (&mut self.inner).take(len).read_to_end(&mut buf).map_err(|e| self.read_error(what, e))?;
        self.offset += buf.len() as u64;
        if buf.len() as u64 != len {
            return Err(GgufError::Truncated { offset: self.offset, what });
        }
        String::from_utf8(buf).map_err(|e| {
            let source = e.utf8_error();
            let bytes = e.as_bytes();
            let mut lossy = String::from_utf8_lossy(&bytes[..bytes.len().min(64)]).into_owned();
            if bytes.len() > 64 {
                lossy.push('…');
            }
            GgufError::Utf8 { what, offset: start, lossy, source }
        })
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
                // Each level costs only 12 bytes of file but a stack frame to read.
                if self.depth >= MAX_NESTING {
                    return Err(GgufError::Implausible {
                        what: "array nesting",
                        value: u64::from(self.depth) + 1,
                        limit: MAX_NESTING.into(),
                    });
                }
                let code = self.u32("array item type")?;
                let item = ValueType::from_code(code).ok_or(GgufError::UnknownType(code))?;
                let len = capped(self.u64("array length")?, MAX_ARRAY, "array length")?;
                let min_bytes = item.min_encoded_len();
                self.fits("array", len.saturating_mul(min_bytes))?;
                let mut items = Vec::with_capacity(self.capacity_for::<Value>(len, min_bytes));
                self.depth += 1;
                for _ in 0..len {
                    self.charge(size_of::<Value>())?;
                    items.push(self.value(item)?);
                }
                self.depth -= 1;
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
        assert!(matches!(err, GgufError::BadMagic), "{err}");
        let err = parse_header(&b"GGUF\x03\0\0\0\x01\0"[..]).unwrap_err();
        assert!(matches!(err, GgufError::Truncated { offset: 8, what: "tensor count" }), "{err}");
    }

    /// The error for a file that is not GGUF says nothing of what it holds: the path may be a
    /// symlink to any file on the host.
    #[test]
    fn a_file_that_is_not_gguf_is_refused_without_showing_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, "root:$6$salt$hash:19000:0:99999:7:::\n").unwrap();
        let err = read_header(&path).unwrap_err();
        let text = err.to_string();
        assert_eq!(text, "not a GGUF file (no GGUF magic)");
        let first_bytes = u32::from_le_bytes(*b"root");
        for shown in ["root".to_owned(), format!("{first_bytes:x}"), format!("{first_bytes}")] {
            assert!(!text.contains(&shown), "{text} shows {shown}");
        }
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

    /// The start of a header with one metadata entry, an array of `item` with `len` items.
    fn one_array(item: ValueType, len: u64) -> Vec<u8> {
        let mut bytes = b"GGUF\x03\0\0\0".to_vec();
        bytes.extend(0u64.to_le_bytes());
        bytes.extend(1u64.to_le_bytes());
        bytes.extend(1u64.to_le_bytes());
        bytes.push(b'k');
        bytes.extend((ValueType::Array as u32).to_le_bytes());
        bytes.extend((item as u32).to_le_bytes());
        bytes.extend(len.to_le_bytes());
        bytes
    }

    #[test]
    fn a_header_that_would_outgrow_the_memory_budget_is_refused_while_it_is_read() {
        // Up to 16M items per array are plausible, and a stream's length is unknown: only the
        // budget stops an endless run of one-byte items that each take a 32-byte Value.
        let stream = std::io::Cursor::new(one_array(ValueType::Bool, 16 << 20)).chain(std::io::repeat(0));
        let limit = 1 << 20;
        let err = parse(stream, None, limit).unwrap_err();
        let GgufError::TooLarge { offset, limit: l } = err else { panic!("{err}") };
        assert_eq!(l, limit);
        assert!(offset < limit / size_of::<Value>() as u64 + 64, "refused only at byte {offset}");
    }

    #[test]
    fn arrays_nest_up_to_the_limit_and_no_deeper() {
        let nested = |levels: u32| {
            let mut bytes = one_array(ValueType::Array, 1);
            for _ in 1..levels {
                bytes.extend((ValueType::Array as u32).to_le_bytes());
                bytes.extend(1u64.to_le_bytes());
            }
            bytes.extend((ValueType::U8 as u32).to_le_bytes());
            bytes.extend(0u64.to_le_bytes());
            bytes
        };
        // `levels` arrays inside the entry's own one.
        assert!(parse_header(&nested(MAX_NESTING - 1)[..]).is_ok());
        let err = parse_header(&nested(MAX_NESTING)[..]).unwrap_err();
        assert!(matches!(err, GgufError::Implausible { what: "array nesting", .. }), "{err}");
    }

    #[test]
    fn alignment_must_be_a_power_of_two() {
        let with_alignment = |value: Value| {
            let mut w = crate::GgufWriter::new();
            w.metadata("general.alignment", value);
            parse_header(&w.to_bytes()[..])
        };
        assert_eq!(with_alignment(Value::U32(64)).unwrap().data_offset % 64, 0);
        for bad in [Value::U32(0), Value::U32(48), Value::String("32".into()), Value::I32(-32)] {
            let err = with_alignment(bad.clone()).unwrap_err();
            assert!(matches!(err, GgufError::Alignment(_)), "{bad:?}: {err}");
        }
    }
}
