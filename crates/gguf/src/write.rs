use crate::{DEFAULT_ALIGNMENT, GgufError, MAGIC, Value};

struct Tensor {
    name: String,
    dims: Vec<u64>,
    data: Vec<f32>,
}

/// Builds a GGUF v3 file with F32 tensors. Dimensions are in ggml order: `dims[0]` is the
/// length of a row.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<Tensor>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn metadata(&mut self, key: &str, value: Value) -> &mut Self {
        self.metadata.push((key.to_owned(), value));
        self
    }

    pub fn tensor(&mut self, name: &str, dims: &[u64], data: Vec<f32>) -> Result<&mut Self, GgufError> {
        // A shape beyond 64 bits needs more values than any Vec holds.
        let want = crate::read::exact_product(dims.iter().copied()).unwrap_or(u64::MAX);
        if data.len() as u64 != want {
            return Err(GgufError::TensorSize { name: name.to_owned(), got: data.len(), want });
        }
        self.tensors.push(Tensor { name: name.to_owned(), dims: dims.to_vec(), data });
        Ok(self)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(MAGIC.to_le_bytes());
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_string(&mut out, key);
            out.extend((value.value_type() as u32).to_le_bytes());
            put_value(&mut out, value);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_string(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(0u32.to_le_bytes()); // F32
            out.extend(offset.to_le_bytes());
            offset = (offset + t.data.len() as u64 * 4).next_multiple_of(DEFAULT_ALIGNMENT);
        }
        pad(&mut out);
        for t in &self.tensors {
            for v in &t.data {
                out.extend(v.to_le_bytes());
            }
            pad(&mut out);
        }
        out
    }
}

fn pad(out: &mut Vec<u8>) {
    out.resize((out.len() as u64).next_multiple_of(DEFAULT_ALIGNMENT) as usize, 0);
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.extend(v.to_le_bytes()),
        Value::U16(v) => out.extend(v.to_le_bytes()),
        Value::I16(v) => out.extend(v.to_le_bytes()),
        Value::U32(v) => out.extend(v.to_le_bytes()),
        Value::I32(v) => out.extend(v.to_le_bytes()),
        Value::F32(v) => out.extend(v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(s) => put_string(out, s),
        Value::Array(ty, items) => {
            out.extend((*ty as u32).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        Value::U64(v) => out.extend(v.to_le_bytes()),
        Value::I64(v) => out.extend(v.to_le_bytes()),
        Value::F64(v) => out.extend(v.to_le_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::parse_header;

    #[test]
    fn round_trips_metadata_and_tensor_table() {
        let mut w = GgufWriter::new();
        w.metadata("general.architecture", Value::String("llama".into()))
            .metadata("llama.block_count", Value::U32(2))
            .metadata("xs", Value::Array(crate::ValueType::I32, vec![Value::I32(-1), Value::I32(7)]));
        w.tensor("a", &[3, 2], vec![0.0; 6]).unwrap();
        w.tensor("b", &[5], vec![1.0; 5]).unwrap();
        let bytes = w.to_bytes();
        let h = parse_header(&bytes[..]).unwrap();
        assert_eq!(h.architecture(), Some("llama"));
        assert_eq!(h.arch_u64("block_count"), Some(2));
        assert_eq!(h.tensors[1].offset, 32);
        assert_eq!(h.tensor_bytes(), Some(44));
        assert_eq!(h.data_offset % 32, 0);
        assert!(h.required_file_size().unwrap() <= bytes.len() as u64);
    }

    #[test]
    fn refuses_data_that_does_not_fit_the_shape() {
        let err = GgufWriter::new().tensor("a", &[3, 2], vec![0.0; 5]).err().unwrap();
        assert!(err.to_string().contains("needs 6"), "{err}");
    }
}
