//! Properties of the GGUF header reader, the one parser that reads a file someone else made
//! (a model downloaded from anywhere): hostile headers are refused cleanly, honest ones read
//! back exactly as they were written.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test states its assumptions by panicking

mod support;

use std::io::{self, Read, Write};

use metalkube_gguf::{GgufError, GgufHeader, GgufWriter, MAGIC, TensorInfo, Value, estimate_memory, parse_header};
use proptest::prelude::*;
use support::{hostile_header, same, value};

/// Reads `bytes` as a file, the way the agent does: its length is known, so overclaims are
/// refused before they are read.
fn read_as_file(bytes: &[u8]) -> Result<GgufHeader, GgufError> {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(bytes).unwrap();
    metalkube_gguf::read_header(file.path())
}

fn same_header(a: &GgufHeader, b: &GgufHeader) -> bool {
    a.version == b.version
        && a.tensors == b.tensors
        && a.data_offset == b.data_offset
        && a.metadata.len() == b.metadata.len()
        && a.metadata.iter().zip(&b.metadata).all(|((ka, va), (kb, vb))| ka == kb && same(va, vb))
}

/// What a refusal must say about where the file went wrong.
fn check_error(err: &GgufError, len: u64) -> Result<(), TestCaseError> {
    prop_assert!(!err.to_string().is_empty());
    match *err {
        GgufError::Truncated { offset, .. } => prop_assert!(offset <= len, "{err} for {len} bytes"),
        GgufError::Overclaimed { offset, needed, remaining, .. } => {
            prop_assert!(needed > remaining, "{err}");
            prop_assert_eq!(offset + remaining, len, "{}", err);
        }
        _ => {}
    }
    Ok(())
}

struct Model {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, Vec<f32>)>,
}

fn model() -> impl Strategy<Value = Model> {
    let tensor = (".{0,10}", prop::collection::vec(1u64..5, 0..4)).prop_flat_map(|(name, dims)| {
        let n = dims.iter().product::<u64>() as usize;
        let data = prop::collection::vec(any::<u32>().prop_map(f32::from_bits), n);
        (Just(name), Just(dims), data)
    });
    (prop::collection::vec(("[a-z.]{0,16}", value()), 0..8), prop::collection::vec(tensor, 0..4))
        .prop_map(|(metadata, tensors)| Model { metadata, tensors })
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shapes: Vec<_> = self.tensors.iter().map(|(n, d, _)| (n, d)).collect();
        f.debug_struct("Model").field("metadata", &self.metadata).field("tensors", &shapes).finish()
    }
}

impl Model {
    fn to_bytes(&self) -> Vec<u8> {
        let mut w = GgufWriter::new();
        for (k, v) in &self.metadata {
            w.metadata(k, v.clone());
        }
        for (name, dims, data) in &self.tensors {
            w.tensor(name, dims, data.clone()).unwrap();
        }
        w.to_bytes()
    }
}

/// The shortest prefix of `bytes` that reads as a whole header: where the header ends.
fn header_end(bytes: &[u8]) -> usize {
    (0..=bytes.len()).find(|&n| parse_header(&bytes[..n]).is_ok()).unwrap()
}

/// Serves `bytes`, then fails with `kind` instead of ending.
struct FailingReader<'a> {
    bytes: &'a [u8],
    kind: io::ErrorKind,
}

impl Read for FailingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.bytes.is_empty() {
            return Err(io::Error::new(self.kind, "the disk said no"));
        }
        self.bytes.read(buf)
    }
}

proptest! {
    /// The reader's first job: bytes from anywhere give a header or a typed error. A panic or a
    /// stack overflow here would take the agent down with the file. The two ways in (a file of
    /// known length, a stream of unknown length) must agree: the known length only lets the
    /// reader refuse sooner, never refuse what the stream reader accepts.
    #[test]
    fn hostile_headers_are_read_or_refused_with_a_typed_error_never_a_panic(h in hostile_header()) {
        let bytes = h.to_bytes();
        let streamed = parse_header(&bytes[..]);
        let from_file = read_as_file(&bytes);
        for result in [&streamed, &from_file] {
            if let Err(e) = result {
                check_error(e, bytes.len() as u64)?;
            }
        }
        match (&streamed, &from_file) {
            (Ok(a), Ok(b)) => prop_assert!(same_header(a, b), "{a:?} != {b:?}"),
            (Err(_), Err(_)) => {}
            _ => prop_assert!(false, "stream {streamed:?} but file {from_file:?}"),
        }
        if let Ok(header) = &streamed {
            // Whatever was read came from the bytes: the data section starts after them.
            prop_assert!(header.data_offset >= 24);
            prop_assert!(header.tensors.iter().all(|t| t.dims.len() <= 8));
        }
    }

    /// A header the crate writes reads back identical: every value type, NaN payloads,
    /// nested arrays, and tensor data where the tensor table says it is.
    #[test]
    fn the_writers_headers_read_back_as_written(m in model()) {
        let bytes = m.to_bytes();
        let h = parse_header(&bytes[..]).unwrap();
        prop_assert!(same_header(&h, &read_as_file(&bytes).unwrap()));
        prop_assert_eq!(h.version, 3);
        prop_assert_eq!(h.metadata.len(), m.metadata.len());
        for ((k, v), (wk, wv)) in h.metadata.iter().zip(&m.metadata) {
            prop_assert_eq!(k, wk);
            prop_assert!(same(v, wv), "{v:?} != {wv:?}");
        }
        prop_assert_eq!(h.tensors.len(), m.tensors.len());
        for (t, (name, dims, data)) in h.tensors.iter().zip(&m.tensors) {
            prop_assert_eq!(&t.name, name);
            prop_assert_eq!(&t.dims, dims);
            prop_assert_eq!(t.ggml_type, 0);
            let start = (h.data_offset + t.offset) as usize;
            let stored: Vec<u32> = bytes[start..start + 4 * data.len()]
                .chunks(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            prop_assert_eq!(stored, data.iter().map(|f| f.to_bits()).collect::<Vec<_>>());
        }
        prop_assert!(h.required_file_size().unwrap() <= bytes.len() as u64);
    }

    /// Cut anywhere inside the header, a file is reported as truncated, at the field the cut
    /// fell in (at most 8 bytes before the cut: no field but a string is longer, and a string
    /// reports where its bytes ran out). Knowing the length may refuse it sooner, as an
    /// overclaim.
    #[test]
    fn every_cut_inside_a_header_is_reported_as_truncated_where_it_falls(m in model(), pick in any::<prop::sample::Index>()) {
        let bytes = m.to_bytes();
        let end = header_end(&bytes);
        for cut in 0..end {
            match parse_header(&bytes[..cut]) {
                Err(GgufError::Truncated { offset, .. }) => {
                    prop_assert!(offset as usize <= cut && cut - (offset as usize) < 8, "cut at {cut}, reported {offset}");
                }
                other => prop_assert!(false, "cut at {cut} of {end}: {other:?}"),
            }
        }
        let cut = pick.index(end.max(1));
        let err = read_as_file(&bytes[..cut]).unwrap_err();
        prop_assert!(matches!(err, GgufError::Truncated { .. } | GgufError::Overclaimed { .. }), "{err}");
        check_error(&err, cut as u64)?;
    }

    /// Wrong magic and unsupported versions are refused by name before anything else is read:
    /// a version with the number found, wrong magic with nothing of the bytes found (the file may
    /// be any file on the host).
    #[test]
    fn only_gguf_magic_and_versions_2_and_3_are_read(magic in prop_oneof![Just(MAGIC), any::<u32>()], version in prop_oneof![0u32..6, any::<u32>()]) {
        let mut bytes = GgufWriter::new().to_bytes();
        bytes[0..4].copy_from_slice(&magic.to_le_bytes());
        bytes[4..8].copy_from_slice(&version.to_le_bytes());
        match parse_header(&bytes[..]) {
            Ok(h) => prop_assert!(magic == MAGIC && (h.version == 2 || h.version == 3) && h.version == version),
            Err(e @ GgufError::BadMagic) => {
                prop_assert!(magic != MAGIC);
                prop_assert_eq!(e.to_string(), "not a GGUF file (no GGUF magic)");
            }
            Err(e @ GgufError::Version(v)) => {
                prop_assert!(magic == MAGIC && v == version && !(2..=3).contains(&v));
                prop_assert!(e.to_string().contains(&v.to_string()), "{e}");
            }
            Err(e) => prop_assert!(false, "{e}"),
        }
    }

    /// A read error that is not the end of the file (a failing disk, a dropped network mount)
    /// is not called truncation, and keeps the OS error as its source.
    #[test]
    fn read_errors_keep_their_cause_and_only_the_end_of_file_is_truncation(m in model(), pick in any::<prop::sample::Index>()) {
        let bytes = m.to_bytes();
        let end = header_end(&bytes);
        let at = pick.index(end.max(1));
        let err = parse_header(FailingReader { bytes: &bytes[..at], kind: io::ErrorKind::PermissionDenied }).unwrap_err();
        match &err {
            GgufError::Read { offset, .. } => prop_assert!(*offset as usize <= at),
            other => prop_assert!(false, "{other:?}"),
        }
        let source = std::error::Error::source(&err).and_then(|s| s.downcast_ref::<io::Error>());
        prop_assert_eq!(source.map(io::Error::kind), Some(io::ErrorKind::PermissionDenied));
        let err = parse_header(FailingReader { bytes: &bytes[..at], kind: io::ErrorKind::UnexpectedEof }).unwrap_err();
        prop_assert!(matches!(err, GgufError::Truncated { .. }), "{err:?}");
    }

    /// Tensor shapes come from the file: sizes are exact or None, never wrapped (a wrapped
    /// size would make a huge model look small to placement).
    #[test]
    fn tensor_sizes_are_exact_or_none_never_wrapped(
        dims in prop::collection::vec(prop_oneof![0u64..1000, any::<u64>()], 0..5),
        ggml_type in prop::sample::select(vec![0u32, 2, 14, 99]),
        offset in prop_oneof![0u64..4096, any::<u64>()],
        data_offset in prop_oneof![0u64..4096, any::<u64>()],
    ) {
        let t = TensorInfo { name: "t".into(), dims: dims.clone(), ggml_type, offset };
        // In 128 bits (overflowing those means beyond 64 bits too), and zero with any zero.
        let elements = if dims.contains(&0) { Some(0) } else { dims.iter().try_fold(1u128, |n, &d| n.checked_mul(d.into())) };
        let want_elements = elements.and_then(|n| u64::try_from(n).ok());
        prop_assert_eq!(t.element_count(), want_elements);
        // (elements per block, bytes per block) for the types picked above; 99 is unknown.
        let block = match ggml_type { 0 => Some((1u128, 4u128)), 2 => Some((32, 18)), 14 => Some((256, 210)), _ => None };
        let want_bytes = match (want_elements, block) {
            (Some(n), Some((per, bytes))) => u64::try_from(u128::from(n).div_ceil(per) * bytes).ok(),
            _ => None,
        };
        prop_assert_eq!(t.byte_size(), want_bytes);
        let h = GgufHeader { version: 3, metadata: vec![], tensors: vec![t.clone(), t], data_offset };
        prop_assert_eq!(h.tensor_bytes(), want_bytes.and_then(|b| b.checked_mul(2)));
        let want_end = want_bytes
            .map(|b| u128::from(data_offset) + u128::from(offset) + u128::from(b))
            .and_then(|e| u64::try_from(e).ok());
        prop_assert_eq!(h.required_file_size(), want_end);
    }

    /// The estimate multiplies figures read from the file: it is exact or None, never a
    /// wrapped small number, and more context never costs less.
    #[test]
    fn memory_estimates_are_exact_or_none_and_grow_with_the_context(
        layers in prop_oneof![1u64..100, any::<u64>()],
        heads in prop_oneof![0u64..64, any::<u64>()],
        kv_heads in prop::option::of(prop_oneof![1u64..64, any::<u64>()]),
        key_length in prop::option::of(prop_oneof![1u64..256, any::<u64>()]),
        embedding in prop_oneof![1u64..8192, any::<u64>()],
        contexts in (prop_oneof![0u64..1 << 20, any::<u64>()], prop_oneof![0u64..1 << 20, any::<u64>()]),
    ) {
        let mut w = GgufWriter::new();
        w.metadata("general.architecture", Value::String("llama".into()))
            .metadata("llama.block_count", Value::U64(layers))
            .metadata("llama.embedding_length", Value::U64(embedding))
            .metadata("llama.attention.head_count", Value::U64(heads));
        if let Some(n) = kv_heads {
            w.metadata("llama.attention.head_count_kv", Value::U64(n));
        }
        if let Some(n) = key_length {
            w.metadata("llama.attention.key_length", Value::U64(n));
        }
        w.tensor("w", &[4, 4], vec![0.0; 16]).unwrap();
        let h = parse_header(&w.to_bytes()[..]).unwrap();
        let (small, large) = (contexts.0.min(contexts.1), contexts.0.max(contexts.1));
        let heads = heads.max(1);
        let kv_heads = kv_heads.unwrap_or(heads);
        let head_dim = key_length.unwrap_or(embedding / heads);
        for context in [small, large] {
            let factors = [2, layers, context, kv_heads, head_dim, 2];
            let exact = if factors.contains(&0) { Some(0) } else { factors.into_iter().try_fold(1u128, |p, f| p.checked_mul(f.into())) };
            let exact = exact.and_then(|p| u64::try_from(p).ok());
            let e = estimate_memory(&h, context);
            prop_assert_eq!(e.map(|e| e.kv_cache_bytes), exact);
            if let Some(e) = e {
                prop_assert!(e.total() >= e.weights_bytes.max(e.kv_cache_bytes).max(e.overhead_bytes));
            }
        }
        if let Some(large) = estimate_memory(&h, large) {
            prop_assert!(estimate_memory(&h, small).is_some_and(|small| small.total() <= large.total()));
        }
    }
}
