//! [`WindowSampler`]: token windows in a seeded order, dealt to the ranks by position.

use super::DataError;
use candle_core::{Device, Tensor};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::{Arc, Mutex};

/// A token stream cut into windows of `seq_len + 1` tokens (each starting `seq_len` after
/// the last, so every token but the first of the stream is a target once per epoch).
///
/// Window `g` of the global order is window `order(g / windows)[g % windows]`: each epoch is
/// a permutation drawn from the seed and the epoch number (or the stream's order, without a
/// seed). What a rank reads is a function of the global position alone.
pub struct WindowSampler {
    tokens: Arc<[u32]>,
    seq_len: usize,
    windows: usize,
    seed: Option<u64>,
    /// The permutation of the epoch last asked for.
    epoch: Mutex<Option<(u64, Vec<u32>)>>,
}

impl WindowSampler {
    /// Windows of `tokens`, shuffled each epoch from `seed` (`None`: in stream order).
    pub fn new(tokens: impl Into<Arc<[u32]>>, seq_len: usize, seed: Option<u64>) -> Result<Self, DataError> {
        let tokens = tokens.into();
        let windows = tokens.len().saturating_sub(1) / seq_len.max(1);
        if seq_len == 0 || windows == 0 {
            return Err(DataError::TooLittle {
                what: "the token stream".to_string(),
                problem: format!("{} tokens make no window of {} (seq_len + 1)", tokens.len(), seq_len + 1),
            });
        }
        Ok(Self { tokens, seq_len, windows, seed, epoch: Mutex::new(None) })
    }

    /// How many windows one epoch has.
    pub fn windows(&self) -> usize {
        self.windows
    }

    /// The `seq_len + 1` tokens of window `g` of the global order.
    pub fn window(&self, g: u64) -> &[u32] {
        let (epoch, within) = (g / self.windows as u64, (g % self.windows as u64) as usize);
        let index = match self.seed {
            None => within,
            Some(seed) => {
                let mut cached = self.epoch.lock().unwrap_or_else(|p| p.into_inner());
                if cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
                    *cached = Some((epoch, permutation(self.windows, seed, epoch)));
                }
                cached.as_ref().expect("just set").1[within] as usize
            }
        };
        let start = index * self.seq_len;
        &self.tokens[start..start + self.seq_len + 1]
    }

    /// `count` windows, the first at global position `first` and each `stride` after the
    /// last, as inputs and next-token targets, each `(count, seq_len)` of `u32`.
    pub fn batch(
        &self,
        first: u64,
        stride: u64,
        count: usize,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let mut inputs = Vec::with_capacity(count * self.seq_len);
        let mut targets = Vec::with_capacity(count * self.seq_len);
        for i in 0..count as u64 {
            let window = self.window(first + i * stride);
            inputs.extend_from_slice(&window[..self.seq_len]);
            targets.extend_from_slice(&window[1..]);
        }
        let shape = (count, self.seq_len);
        Ok((Tensor::from_vec(inputs, shape, device)?, Tensor::from_vec(targets, shape, device)?))
    }

    /// Rank `rank`'s `batch` windows of the step that starts at global position `position`
    /// (the step takes `world · batch` windows from there).
    pub fn rank_batch(
        &self,
        position: u64,
        rank: usize,
        batch: usize,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        self.batch(position + (rank * batch) as u64, 1, batch, device)
    }
}

/// A permutation of `0..n` drawn from `seed` and `epoch` (Fisher-Yates over ChaCha8).
fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(b"windows\0");
    let mut rng = ChaCha8Rng::from_seed(key);
    let mut order: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_epoch_is_a_permutation_and_epochs_differ() {
        let a = permutation(50, 7, 0);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<u32>>());
        assert_ne!(a, permutation(50, 7, 1), "the next epoch is shuffled anew");
        assert_eq!(a, permutation(50, 7, 0), "a function of the seed and the epoch");
    }

    #[test]
    fn windows_overlap_by_one_token_and_cover_the_stream() {
        let sampler = WindowSampler::new((0..21).collect::<Vec<u32>>(), 4, None).unwrap();
        assert_eq!(sampler.windows(), 5);
        assert_eq!(sampler.window(0), [0, 1, 2, 3, 4]);
        assert_eq!(sampler.window(4), [16, 17, 18, 19, 20]);
        assert_eq!(sampler.window(5), [0, 1, 2, 3, 4], "the next epoch starts over");
        assert!(WindowSampler::new(vec![1, 2, 3], 4, None).is_err(), "3 tokens make no window of 5");
    }
}
