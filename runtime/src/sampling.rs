//! The sampling chain, in llama.cpp's order: repetition penalty over the last n tokens, top-k,
//! top-p, min-p, temperature, then a draw from a seeded generator. Temperature 0 is greedy.

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use std::collections::VecDeque;

/// Sampling settings, with llama.cpp's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 (or less) picks the most likely token.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the most likely tokens whose probabilities add up to p; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 keeps all.
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of recent tokens; 1 is off.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        }
    }
}

/// A sampler: the chain plus the generator and the recent tokens.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    recent: VecDeque<u32>,
}

/// The index of the largest value, the lowest index on ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Sampler {
            params,
            rng,
            recent: VecDeque::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether the next token is always the largest logit's (temperature 0, no repetition
    /// penalty): the logits themselves are then not needed, only their argmax.
    pub fn is_greedy(&self) -> bool {
        self.params.temperature <= 0.0 && self.params.repeat_penalty == 1.0
    }

    /// Records a token (prompt or generated) for the repetition penalty.
    pub fn accept(&mut self, token: u32) {
        if self.params.repeat_last_n == 0 {
            return;
        }
        if self.recent.len() == self.params.repeat_last_n {
            self.recent.pop_front();
        }
        self.recent.push_back(token);
    }

    /// Picks the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.is_greedy() {
            return argmax(logits);
        }
        let p = &self.params;
        let mut logits = logits.to_vec();
        if p.repeat_penalty != 1.0 {
            let mut seen = std::collections::HashSet::new();
            for &t in &self.recent {
                if seen.insert(t)
                    && let Some(l) = logits.get_mut(t as usize)
                {
                    *l = if *l > 0.0 {
                        *l / p.repeat_penalty
                    } else {
                        *l * p.repeat_penalty
                    };
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(&logits);
        }
        // Candidates, most likely first (ties by id).
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cand.len() {
            // Only the k best need sorting: partition first (a full sort of a 128k vocabulary
            // costs milliseconds per token).
            cand.select_nth_unstable_by(p.top_k - 1, order);
            cand.truncate(p.top_k);
        }
        cand.sort_by(order);
        if p.top_p < 1.0 {
            let probs = softmax(&cand);
            let mut cum = 0.0;
            let mut keep = cand.len();
            for (i, pr) in probs.iter().enumerate() {
                cum += pr;
                if cum >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let threshold = cand[0].1 + p.min_p.ln();
            let keep = cand.iter().take_while(|c| c.1 >= threshold).count();
            cand.truncate(keep.max(1));
        }
        for c in &mut cand {
            c.1 /= p.temperature;
        }
        let probs = softmax(&cand);
        let r = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let mut cum = 0.0;
        for (c, pr) in cand.iter().zip(&probs) {
            cum += pr;
            if r < cum {
                return c.0;
            }
        }
        cand.last().expect("at least one candidate").0
    }
}

fn softmax(cand: &[(u32, f32)]) -> Vec<f64> {
    let max = cand.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.1)) as f64;
    let e: Vec<f64> = cand.iter().map(|c| (c.1 as f64 - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|x| x / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_lowest_id_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.5, 2.0, 2.0, -1.0]), 1);
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let params = SamplingParams {
            seed: 42,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            temperature: 1.0,
            ..SamplingParams::default()
        };
        let draws = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draws(&params), draws(&params));
        assert_ne!(
            draws(&params),
            draws(&SamplingParams {
                seed: 43,
                ..params.clone()
            })
        );
        // Drawn tokens are spread over the vocabulary, not stuck on one.
        let distinct: std::collections::HashSet<u32> = draws(&params).into_iter().collect();
        assert!(distinct.len() > 10);
    }

    #[test]
    fn filters_narrow_the_candidates() {
        let logits = [5.0f32, 4.0, 1.0, 0.0, -3.0];
        // top-k 1 is greedy whatever the temperature.
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            temperature: 5.0,
            ..SamplingParams::default()
        });
        assert!((0..20).all(|_| s.sample(&logits) == 0));
        // min-p 0.5 keeps only tokens within ln 2 of the best: token 0 alone.
        let mut s = Sampler::new(SamplingParams {
            top_k: 0,
            top_p: 1.0,
            min_p: 0.5,
            temperature: 2.0,
            ..SamplingParams::default()
        });
        assert!((0..20).all(|_| s.sample(&logits) == 0));
        // top-p 0.7: token 0 has probability 0.71, so it alone is kept.
        let mut s = Sampler::new(SamplingParams {
            top_k: 0,
            top_p: 0.7,
            min_p: 0.0,
            temperature: 3.0,
            ..SamplingParams::default()
        });
        assert!((0..20).all(|_| s.sample(&logits) == 0));
    }

    #[test]
    fn repetition_penalty_moves_the_argmax() {
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&[3.0, 2.0, -1.0]), 0);
        s.accept(0);
        // 3/2 = 1.5 < 2.
        assert_eq!(s.sample(&[3.0, 2.0, -1.0]), 1);
    }

    #[test]
    fn the_penalty_forgets_tokens_older_than_repeat_last_n() {
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            repeat_last_n: 2,
            ..SamplingParams::greedy()
        });
        let logits = [3.0, 2.0, -1.0, 0.5];
        s.accept(0);
        assert_eq!(s.sample(&logits), 1);
        s.accept(2);
        assert_eq!(s.sample(&logits), 1, "0 is still among the last 2");
        s.accept(3);
        assert_eq!(s.sample(&logits), 0, "0 left the window");
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            repeat_last_n: 0,
            ..SamplingParams::greedy()
        });
        s.accept(0);
        assert_eq!(s.sample(&logits), 0, "repeat_last_n 0 disables the penalty");
    }

    /// Draw frequencies of `params` over `logits`, in 4000 draws.
    fn frequencies(params: SamplingParams, logits: &[f32]) -> Vec<f64> {
        let mut s = Sampler::new(params);
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..4000 {
            counts[s.sample(logits) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / 4000.0).collect()
    }

    #[test]
    fn temperature_and_top_k_shape_the_draws() {
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        let open = SamplingParams {
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 5,
            ..SamplingParams::default()
        };
        // Temperature 1: softmax(2, 1, 0, -1) = 0.644, 0.237, 0.087, 0.032.
        let f = frequencies(
            SamplingParams {
                temperature: 1.0,
                ..open.clone()
            },
            &logits,
        );
        for (got, want) in f.iter().zip([0.644, 0.237, 0.087, 0.032]) {
            assert!((got - want).abs() < 0.03, "{f:?}");
        }
        // Temperature 0.5 doubles the gaps: 0.865, 0.117, 0.016, 0.002.
        let f = frequencies(
            SamplingParams {
                temperature: 0.5,
                ..open.clone()
            },
            &logits,
        );
        assert!(
            (f[0] - 0.865).abs() < 0.03 && (f[1] - 0.117).abs() < 0.03,
            "{f:?}"
        );
        // top-k 2 at temperature 1: 0.731, 0.269, and never the others.
        let f = frequencies(
            SamplingParams {
                top_k: 2,
                temperature: 1.0,
                ..open
            },
            &logits,
        );
        assert!(
            (f[0] - 0.731).abs() < 0.03 && (f[1] - 0.269).abs() < 0.03,
            "{f:?}"
        );
        assert_eq!(f[2] + f[3], 0.0, "{f:?}");
    }
}
