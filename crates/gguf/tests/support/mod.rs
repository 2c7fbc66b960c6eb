//! Generators shared by the GGUF property tests: well-formed metadata for round trips, and
//! hostile headers whose counts and lengths lie.

#![allow(dead_code)] // each test binary uses part of this

use metalkube_gguf::{MAGIC, Value, ValueType};
use proptest::prelude::*;

pub const SCALAR_TYPES: [ValueType; 12] = [
    ValueType::U8,
    ValueType::I8,
    ValueType::U16,
    ValueType::I16,
    ValueType::U32,
    ValueType::I32,
    ValueType::F32,
    ValueType::Bool,
    ValueType::String,
    ValueType::U64,
    ValueType::I64,
    ValueType::F64,
];

/// Any value of a scalar type. Floats come from arbitrary bits, NaN payloads included.
pub fn scalar_of(ty: ValueType) -> BoxedStrategy<Value> {
    match ty {
        ValueType::U8 => any::<u8>().prop_map(Value::U8).boxed(),
        ValueType::I8 => any::<i8>().prop_map(Value::I8).boxed(),
        ValueType::U16 => any::<u16>().prop_map(Value::U16).boxed(),
        ValueType::I16 => any::<i16>().prop_map(Value::I16).boxed(),
        ValueType::U32 => any::<u32>().prop_map(Value::U32).boxed(),
        ValueType::I32 => any::<i32>().prop_map(Value::I32).boxed(),
        ValueType::F32 => any::<u32>().prop_map(|b| Value::F32(f32::from_bits(b))).boxed(),
        ValueType::Bool => any::<bool>().prop_map(Value::Bool).boxed(),
        ValueType::String => ".{0,12}".prop_map(Value::String).boxed(),
        ValueType::U64 => any::<u64>().prop_map(Value::U64).boxed(),
        ValueType::I64 => any::<i64>().prop_map(Value::I64).boxed(),
        ValueType::F64 => any::<u64>().prop_map(|b| Value::F64(f64::from_bits(b))).boxed(),
        ValueType::Array => unreachable!("not a scalar type"),
    }
}

/// Well-formed values: scalars and arrays whose items all have the array's type, nested a few
/// levels (each nested array declares its own item type, as the format allows).
pub fn value() -> impl Strategy<Value = Value> {
    let scalar = prop::sample::select(&SCALAR_TYPES[..]).prop_flat_map(scalar_of);
    let flat_array = prop::sample::select(&SCALAR_TYPES[..])
        .prop_flat_map(|ty| prop::collection::vec(scalar_of(ty), 0..6).prop_map(move |items| Value::Array(ty, items)));
    let array = flat_array.prop_recursive(3, 24, 4, |inner| {
        prop::collection::vec(inner, 0..4).prop_map(|items| Value::Array(ValueType::Array, items))
    });
    prop_oneof![3 => scalar, 1 => array]
}

/// Compares values bit for bit: a float NaN must come back with its payload.
pub fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::F32(x), Value::F32(y)) => x.to_bits() == y.to_bits(),
        (Value::F64(x), Value::F64(y)) => x.to_bits() == y.to_bits(),
        (Value::Array(ta, xs), Value::Array(tb, ys)) => {
            ta == tb && xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| same(x, y))
        }
        _ => a == b,
    }
}

/// A count or length field: the truth, or (one time in 30, so that most headers keep only a
/// flaw or two and the reader gets past them) a lie picked from the values that break
/// parsers: the reader's own limits and one past them, 2^63, u64::MAX, small numbers.
#[derive(Debug, Clone, Copy)]
pub enum Claim {
    Honest,
    Lie(u64),
}

impl Claim {
    pub fn of(self, truth: u64) -> u64 {
        match self {
            Claim::Honest => truth,
            Claim::Lie(n) => n,
        }
    }
}

pub fn claim() -> impl Strategy<Value = Claim> {
    let lie = prop_oneof![
        0u64..40,
        prop::sample::select(vec![
            1 << 16,
            (1 << 16) + 1,
            1 << 20,
            (1 << 20) + 1,
            16 << 20,
            (16 << 20) + 1,
            1 << 32,
            1 << 63,
            u64::MAX,
        ]),
        any::<u64>(),
    ];
    prop_oneof![30 => Just(Claim::Honest), 1 => lie.prop_map(Claim::Lie)]
}

/// A metadata value as bytes may present it: the type code it claims and what follows.
#[derive(Debug, Clone)]
pub enum Hostile {
    /// Raw bytes after a type code, of the right size for the code or not.
    Scalar {
        code: u32,
        bytes: Vec<u8>,
    },
    Str {
        len: Claim,
        bytes: Vec<u8>,
    },
    Array {
        item_code: u32,
        len: Claim,
        items: Vec<Hostile>,
    },
    /// Arrays of one array each, `depth` levels down: a few bytes per level.
    Deep {
        depth: u32,
    },
}

impl Hostile {
    /// The type code a well-formed file would put before this value.
    pub fn code(&self) -> u32 {
        match self {
            Hostile::Scalar { code, .. } => *code,
            Hostile::Str { .. } => ValueType::String as u32,
            Hostile::Array { .. } | Hostile::Deep { .. } => ValueType::Array as u32,
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Hostile::Scalar { bytes, .. } => out.extend(bytes),
            Hostile::Str { len, bytes } => put_str(out, *len, bytes),
            Hostile::Array { item_code, len, items } => {
                out.extend(item_code.to_le_bytes());
                out.extend(len.of(items.len() as u64).to_le_bytes());
                for item in items {
                    item.encode(out);
                }
            }
            Hostile::Deep { depth } => {
                for _ in 0..*depth {
                    out.extend((ValueType::Array as u32).to_le_bytes());
                    out.extend(1u64.to_le_bytes());
                }
                out.extend((ValueType::U8 as u32).to_le_bytes());
                out.extend(0u64.to_le_bytes());
            }
        }
    }
}

pub fn put_str(out: &mut Vec<u8>, len: Claim, bytes: &[u8]) {
    out.extend(len.of(bytes.len() as u64).to_le_bytes());
    out.extend(bytes);
}

/// A value type's code: a valid one, or one time in 30 any number.
fn type_code() -> impl Strategy<Value = u32> {
    prop_oneof![30 => 0u32..13, 1 => any::<u32>()]
}

/// UTF-8, or one time in 30 any bytes.
fn text() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![30 => ".{0,8}".prop_map(String::into_bytes), 1 => prop::collection::vec(any::<u8>(), 0..8)]
}

/// Bytes of a scalar of the code's size, or one time in 30 of any size.
fn scalar_bytes(code: u32) -> BoxedStrategy<Vec<u8>> {
    let size = match code {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    };
    match size {
        Some(n) => prop_oneof![
            30 => prop::collection::vec(any::<u8>(), n),
            1 => prop::collection::vec(any::<u8>(), 0..9),
        ]
        .boxed(),
        _ => prop::collection::vec(any::<u8>(), 0..9).boxed(),
    }
}

pub fn hostile_value() -> impl Strategy<Value = Hostile> {
    let scalar =
        prop_oneof![30 => prop::sample::select(vec![0u32, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12]), 1 => any::<u32>()]
            .prop_flat_map(|code| scalar_bytes(code).prop_map(move |bytes| Hostile::Scalar { code, bytes }));
    let string = (claim(), text()).prop_map(|(len, bytes)| Hostile::Str { len, bytes });
    // Nested past the reader's limit of 8 at once, or far past it (a few bytes a level).
    let deep = prop_oneof![0u32..12, 12u32..30_000].prop_map(|depth| Hostile::Deep { depth });
    let leaf = prop_oneof![20 => scalar, 10 => string, 1 => deep];
    leaf.prop_recursive(4, 32, 6, |inner| {
        // Items of the declared type: the first item's, or one time in 30 another.
        (prop::collection::vec(inner, 0..6), prop::option::weighted(1.0 / 30.0, type_code()), claim()).prop_map(
            |(items, other_code, len)| {
                let item_code = other_code.or(items.first().map(Hostile::code)).unwrap_or(0);
                let items = items.into_iter().filter(|i| other_code.is_some() || i.code() == item_code).collect();
                Hostile::Array { item_code, len, items }
            },
        )
    })
}

#[derive(Debug, Clone)]
pub struct HostileKv {
    key_len: Claim,
    key: Vec<u8>,
    /// None: the value's own code.
    code: Option<u32>,
    value: Hostile,
}

#[derive(Debug, Clone)]
pub struct HostileTensor {
    name_len: Claim,
    name: Vec<u8>,
    n_dims: Claim,
    dims: Vec<u64>,
    ggml_type: u32,
    offset: u64,
}

#[derive(Debug, Clone)]
pub struct HostileHeader {
    magic: u32,
    version: u32,
    tensor_count: Claim,
    kv_count: Claim,
    kvs: Vec<HostileKv>,
    tensors: Vec<HostileTensor>,
    /// Where the file is cut, as a share of its length; None keeps it whole.
    cut: Option<prop::sample::Index>,
    tail: Vec<u8>,
}

fn hostile_kv() -> impl Strategy<Value = HostileKv> {
    (claim(), text(), prop::option::weighted(1.0 / 30.0, any::<u32>()), hostile_value())
        .prop_map(|(key_len, key, code, value)| HostileKv { key_len, key, code, value })
}

fn hostile_tensor() -> impl Strategy<Value = HostileTensor> {
    let dim = prop_oneof![0u64..300, any::<u64>()];
    (
        claim(),
        text(),
        prop_oneof![30 => Just(Claim::Honest), 1 => any::<u32>().prop_map(|n| Claim::Lie(n.into()))],
        prop::collection::vec(dim, 0..5),
        prop_oneof![30 => 0u32..40, 1 => any::<u32>()],
        prop_oneof![0u64..4096, any::<u64>()],
    )
        .prop_map(|(name_len, name, n_dims, dims, ggml_type, offset)| HostileTensor {
            name_len,
            name,
            n_dims,
            dims,
            ggml_type,
            offset,
        })
}

pub fn hostile_header() -> impl Strategy<Value = HostileHeader> {
    (
        prop_oneof![30 => Just(MAGIC), 1 => any::<u32>()],
        prop_oneof![30 => 2u32..=3, 1 => any::<u32>()],
        claim(),
        claim(),
        prop::collection::vec(hostile_kv(), 0..5),
        prop::collection::vec(hostile_tensor(), 0..4),
        prop::option::weighted(0.2, any::<prop::sample::Index>()),
        prop::collection::vec(any::<u8>(), 0..16),
    )
        .prop_map(|(magic, version, tensor_count, kv_count, kvs, tensors, cut, tail)| HostileHeader {
            magic,
            version,
            tensor_count,
            kv_count,
            kvs,
            tensors,
            cut,
            tail,
        })
}

impl HostileHeader {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(self.magic.to_le_bytes());
        out.extend(self.version.to_le_bytes());
        out.extend(self.tensor_count.of(self.tensors.len() as u64).to_le_bytes());
        out.extend(self.kv_count.of(self.kvs.len() as u64).to_le_bytes());
        for kv in &self.kvs {
            put_str(&mut out, kv.key_len, &kv.key);
            out.extend(kv.code.unwrap_or(kv.value.code()).to_le_bytes());
            kv.value.encode(&mut out);
        }
        for t in &self.tensors {
            put_str(&mut out, t.name_len, &t.name);
            out.extend((t.n_dims.of(t.dims.len() as u64) as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.ggml_type.to_le_bytes());
            out.extend(t.offset.to_le_bytes());
        }
        out.extend(&self.tail);
        if let Some(cut) = self.cut {
            out.truncate(cut.index(out.len() + 1));
        }
        out
    }
}
