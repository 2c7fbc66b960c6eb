//! What serving a model costs in memory, from its GGUF header: the weights, the KV cache for the
//! context, and an allowance for llama.cpp's compute buffers.

use crate::GgufHeader;
use crate::read::exact_product;

/// Compute buffers and runtime: a fixed part plus a share of the weights. Deliberately on the
/// generous side: an over-estimate leaves a Mac idle, an under-estimate makes it swap.
const FIXED_OVERHEAD_BYTES: u64 = 256 << 20;
const WEIGHT_OVERHEAD_PERCENT: u64 = 5;
/// llama-server's default KV cache type is f16.
const KV_BYTES_PER_ELEMENT: u64 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    pub weights_bytes: u64,
    pub kv_cache_bytes: u64,
    pub overhead_bytes: u64,
}

impl MemoryEstimate {
    /// The sum, saturating: a total beyond 64 bits fits no machine either way.
    pub fn total(&self) -> u64 {
        self.weights_bytes.saturating_add(self.kv_cache_bytes).saturating_add(self.overhead_bytes)
    }
}

/// Estimate for `context_size` tokens in total (llama-server shares `--ctx-size` among its
/// slots, so the slot count does not multiply it). None when the header lacks what is needed,
/// or when its figures (which come from the file) multiply beyond 64 bits.
pub fn estimate_memory(header: &GgufHeader, context_size: u64) -> Option<MemoryEstimate> {
    let weights = header.tensor_bytes()?;
    let layers = header.arch_u64("block_count")?;
    let embedding = header.arch_u64("embedding_length")?;
    let heads = header.arch_u64("attention.head_count")?.max(1);
    let kv_heads = header.arch_u64("attention.head_count_kv").unwrap_or(heads);
    let head_dim = header.arch_u64("attention.key_length").unwrap_or(embedding / heads);
    // K and V, per layer, per token.
    let kv = exact_product([2, layers, context_size, kv_heads, head_dim, KV_BYTES_PER_ELEMENT].into_iter())?;
    // In 128 bits: a share of a 64-bit figure always fits back into 64.
    let share = (u128::from(weights) * u128::from(WEIGHT_OVERHEAD_PERCENT) / 100) as u64;
    let overhead = FIXED_OVERHEAD_BYTES.checked_add(share)?;
    Some(MemoryEstimate { weights_bytes: weights, kv_cache_bytes: kv, overhead_bytes: overhead })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TinyModel;
    use crate::read::parse_header;

    #[test]
    fn tiny_model_estimate_adds_up() {
        let bytes = TinyModel::default().to_bytes().unwrap();
        let h = parse_header(&bytes[..]).unwrap();
        let e = estimate_memory(&h, 1024).unwrap();
        assert_eq!(e.weights_bytes, h.tensor_bytes().unwrap());
        // 2 (K,V) x 2 layers x 1024 tokens x 64 (4 heads x 16) x 2 bytes
        assert_eq!(e.kv_cache_bytes, 2 * 2 * 1024 * 64 * 2);
        assert!(e.total() > e.weights_bytes + e.kv_cache_bytes);
        assert_eq!(estimate_memory(&h, 2048).unwrap().kv_cache_bytes, 2 * e.kv_cache_bytes);
    }
}
