//! The models compute PyTorch's / Hugging Face's functions, and their backward is right.
//!
//! - Forward: each model (built in f64) against an independent reference written here with
//!   plain loops over `Vec<f64>`, following the PyTorch definitions (`nn.MultiheadAttention`,
//!   post-norm `nn.TransformerEncoderLayer`/`DecoderLayer`, eval-mode `BatchNorm1d` on
//!   `(T, B, D)`, Hugging Face Llama with rotate-half RoPE, GQA and a causal mask).
//! - Backward: every parameter receives a gradient (none is cut off by a forward-only
//!   kernel), buffers receive none, and sampled gradient entries equal central finite
//!   differences.

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_fsdp::models::llama::{Llama, LlamaConfig};
use candle_fsdp::models::transformer::{Transformer, TransformerConfig};
use candle_fsdp::models::Kernels;
use candle_nn::{VarBuilder, VarMap};
use fsdp_testkit::fsdp_test_models::{NestedWrappedModule, TransformerWithSharedParams};

type Rows = Vec<Vec<f64>>;

fn var(varmap: &VarMap, name: &str) -> Var {
    varmap.data().lock().unwrap().get(name).unwrap_or_else(|| panic!("no var {name}")).clone()
}

fn values(varmap: &VarMap, name: &str) -> Vec<f64> {
    var(varmap, name).as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// A `(rows, cols)` parameter as rows.
fn matrix(varmap: &VarMap, name: &str) -> Rows {
    let t = var(varmap, name);
    t.as_tensor().to_vec2::<f64>().unwrap()
}

/// Replaces a variable's values (e.g. non-trivial running statistics).
fn set(varmap: &VarMap, name: &str, data: &[f64]) {
    let v = var(varmap, name);
    let t = Tensor::from_slice(data, v.as_tensor().shape(), &Device::Cpu).unwrap();
    v.set(&t).unwrap();
}

fn linear(x: &Rows, w: &Rows, b: Option<&[f64]>) -> Rows {
    x.iter()
        .map(|row| {
            w.iter()
                .enumerate()
                .map(|(o, w_row)| {
                    let dot: f64 = row.iter().zip(w_row).map(|(a, b)| a * b).sum();
                    dot + b.map_or(0.0, |b| b[o])
                })
                .collect()
        })
        .collect()
}

fn add(a: &Rows, b: &Rows) -> Rows {
    a.iter().zip(b).map(|(x, y)| x.iter().zip(y).map(|(p, q)| p + q).collect()).collect()
}

fn relu(x: &Rows) -> Rows {
    x.iter().map(|r| r.iter().map(|v| v.max(0.0)).collect()).collect()
}

fn layer_norm(x: &Rows, w: &[f64], b: &[f64], eps: f64) -> Rows {
    x.iter()
        .map(|row| {
            let n = row.len() as f64;
            let mean = row.iter().sum::<f64>() / n;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            row.iter().enumerate().map(|(i, v)| (v - mean) / (var + eps).sqrt() * w[i] + b[i]).collect()
        })
        .collect()
}

fn rms_norm(x: &Rows, w: &[f64], eps: f64) -> Rows {
    x.iter()
        .map(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64;
            row.iter().enumerate().map(|(i, v)| v / (ms + eps).sqrt() * w[i]).collect()
        })
        .collect()
}

fn softmax(row: &[f64]) -> Vec<f64> {
    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = row.iter().map(|v| (v - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|v| v / sum).collect()
}

/// Per-head scaled dot-product attention; `kv_head(h)` picks the key/value head of query
/// head `h`; `causal` masks keys after the query.
fn attention(
    q: &Rows,
    k: &Rows,
    v: &Rows,
    heads: usize,
    head_dim: usize,
    kv_head: impl Fn(usize) -> usize,
    causal: bool,
) -> Rows {
    let mut out = vec![vec![0.0; heads * head_dim]; q.len()];
    for h in 0..heads {
        let g = kv_head(h);
        for i in 0..q.len() {
            let scores: Vec<f64> = (0..k.len())
                .map(|j| {
                    if causal && j > i {
                        return f64::NEG_INFINITY;
                    }
                    (0..head_dim).map(|d| q[i][h * head_dim + d] * k[j][g * head_dim + d]).sum::<f64>()
                        / (head_dim as f64).sqrt()
                })
                .collect();
            let p = softmax(&scores);
            for d in 0..head_dim {
                out[i][h * head_dim + d] = (0..k.len()).map(|j| p[j] * v[j][g * head_dim + d]).sum();
            }
        }
    }
    out
}

/// `nn.MultiheadAttention` from its state dict entries under `prefix`.
fn mha(varmap: &VarMap, prefix: &str, query: &Rows, kv: &Rows, heads: usize) -> Rows {
    let w = matrix(varmap, &format!("{prefix}.in_proj_weight"));
    let b = values(varmap, &format!("{prefix}.in_proj_bias"));
    let e = w[0].len();
    let q = linear(query, &w[0..e].to_vec(), Some(&b[0..e]));
    let k = linear(kv, &w[e..2 * e].to_vec(), Some(&b[e..2 * e]));
    let v = linear(kv, &w[2 * e..].to_vec(), Some(&b[2 * e..]));
    let out = attention(&q, &k, &v, heads, e / heads, |h| h, false);
    linear(
        &out,
        &matrix(varmap, &format!("{prefix}.out_proj.weight")),
        Some(&values(varmap, &format!("{prefix}.out_proj.bias"))),
    )
}

fn ln(varmap: &VarMap, prefix: &str, x: &Rows) -> Rows {
    layer_norm(x, &values(varmap, &format!("{prefix}.weight")), &values(varmap, &format!("{prefix}.bias")), 1e-5)
}

fn lin(varmap: &VarMap, prefix: &str, x: &Rows) -> Rows {
    linear(x, &matrix(varmap, &format!("{prefix}.weight")), Some(&values(varmap, &format!("{prefix}.bias"))))
}

fn feed_forward(varmap: &VarMap, p: &str, x: &Rows) -> Rows {
    lin(varmap, &format!("{p}.linear2"), &relu(&lin(varmap, &format!("{p}.linear1"), x)))
}

/// `nn.Transformer` on one batch element: `src` `(S, E)`, `tgt` `(T, E)`.
fn reference_transformer(varmap: &VarMap, prefix: &str, config: &TransformerConfig, src: &Rows, tgt: &Rows) -> Rows {
    let heads = config.nhead;
    let mut x = src.clone();
    for i in 0..config.num_encoder_layers {
        let p = format!("{prefix}encoder.layers.{i}");
        x = ln(varmap, &format!("{p}.norm1"), &add(&x, &mha(varmap, &format!("{p}.self_attn"), &x, &x, heads)));
        x = ln(varmap, &format!("{p}.norm2"), &add(&x, &feed_forward(varmap, &p, &x)));
    }
    let memory = ln(varmap, &format!("{prefix}encoder.norm"), &x);
    let mut x = tgt.clone();
    for i in 0..config.num_decoder_layers {
        let p = format!("{prefix}decoder.layers.{i}");
        x = ln(varmap, &format!("{p}.norm1"), &add(&x, &mha(varmap, &format!("{p}.self_attn"), &x, &x, heads)));
        x = ln(
            varmap,
            &format!("{p}.norm2"),
            &add(&x, &mha(varmap, &format!("{p}.multihead_attn"), &x, &memory, heads)),
        );
        x = ln(varmap, &format!("{p}.norm3"), &add(&x, &feed_forward(varmap, &p, &x)));
    }
    ln(varmap, &format!("{prefix}decoder.norm"), &x)
}

/// Column `n` of a `(L, N, E)` tensor as `L` rows.
fn batch_rows(t: &Tensor, n: usize) -> Rows {
    t.narrow(1, n, 1).unwrap().squeeze(1).unwrap().to_vec2::<f64>().unwrap()
}

fn assert_close(actual: &Rows, expected: &Rows, tol: f64, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: rows");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert_eq!(a.len(), e.len(), "{what}: row {i} length");
        for (j, (x, y)) in a.iter().zip(e).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{what}[{i}][{j}]: {x} vs {y}");
        }
    }
}

fn small_transformer_config() -> TransformerConfig {
    TransformerConfig {
        d_model: 8,
        nhead: 2,
        num_encoder_layers: 2,
        num_decoder_layers: 2,
        dim_feedforward: 12,
        layer_norm_eps: 1e-5,
    }
}

fn f64_builder(varmap: &VarMap) -> VarBuilder<'static> {
    VarBuilder::from_varmap(varmap, DType::F64, &Device::Cpu)
}

/// Randomises every LayerNorm/BatchNorm affine parameter and attention bias (they start
/// at constants, which would hide index mistakes).
fn randomize(varmap: &VarMap) {
    let names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    for name in names {
        let v = var(varmap, &name);
        if v.as_tensor().rank() == 1 && !name.contains("running") && !name.ends_with("_buffer") && name != "vocab_bias"
        {
            let t = Tensor::randn(0f64, 0.5, v.as_tensor().shape(), &Device::Cpu).unwrap();
            let t = if name.ends_with("weight") { (t + 1.0).unwrap() } else { t };
            v.set(&t).unwrap();
        }
    }
}

#[test]
fn transformer_matches_the_pytorch_definition() {
    let config = small_transformer_config();
    let varmap = VarMap::new();
    let model = Transformer::new(&config, f64_builder(&varmap)).unwrap();
    randomize(&varmap);
    let src = Tensor::randn(0f64, 1.0, (5, 3, 8), &Device::Cpu).unwrap();
    let tgt = Tensor::randn(0f64, 1.0, (4, 3, 8), &Device::Cpu).unwrap();
    let out = model.forward(&src, &tgt).unwrap();
    assert_eq!(out.dims(), [4, 3, 8]);
    for n in 0..3 {
        let expected = reference_transformer(&varmap, "", &config, &batch_rows(&src, n), &batch_rows(&tgt, n));
        assert_close(&batch_rows(&out, n), &expected, 1e-10, &format!("batch {n}"));
    }
}

#[test]
fn transformer_with_shared_params_matches_the_pytorch_definition() {
    let varmap = VarMap::new();
    let model = TransformerWithSharedParams::new(true, f64_builder(&varmap)).unwrap();
    randomize(&varmap);
    set(&varmap, "bn.running_mean", &[0.3, -0.2]);
    set(&varmap, "bn.running_var", &[1.5, 0.5]);
    let (src_ids, tgt_ids) = TransformerWithSharedParams::get_input(&Device::Cpu).unwrap();
    let out = model.forward(&src_ids, &tgt_ids).unwrap();
    assert_eq!(out.dims(), [4, 2, 23]);

    let embed = matrix(&varmap, "embed_tokens.weight");
    let vocab_bias = values(&varmap, "vocab_bias");
    let (bn_w, bn_b) = (values(&varmap, "bn.weight"), values(&varmap, "bn.bias"));
    let (mean, var) = ([0.3, -0.2], [1.5, 0.5]);
    let src = src_ids.to_vec2::<u32>().unwrap();
    let tgt = tgt_ids.to_vec2::<u32>().unwrap();
    let config = TransformerWithSharedParams::transformer_config();
    let mut expected_loss = 0.0;
    for n in 0..2 {
        // src = embed + vocab_bias + long_buffer (zeros).
        let s: Rows = src
            .iter()
            .map(|row| embed[row[n] as usize].iter().zip(&vocab_bias).map(|(e, b)| e + b).collect())
            .collect();
        // BatchNorm1d(2) on (T, B, D): channel = batch index n, running statistics.
        let t: Rows = tgt
            .iter()
            .map(|row| {
                embed[row[n] as usize]
                    .iter()
                    .map(|e| (e - mean[n]) / (var[n] + 1e-5f64).sqrt() * bn_w[n] + bn_b[n])
                    .collect()
            })
            .collect();
        let x = reference_transformer(&varmap, "transformer.", &config, &s, &t);
        // output_proj: the embedding matrix is its weight.
        let logits = linear(&x, &embed, Some(&values(&varmap, "output_proj.bias")));
        assert_close(&batch_rows(&out, n), &logits, 1e-10, &format!("batch {n}"));
        for (i, row) in logits.iter().enumerate() {
            let p = softmax(row);
            expected_loss -= p[tgt[i][n] as usize].ln();
        }
    }
    let loss = TransformerWithSharedParams::get_loss(&tgt_ids, &out).unwrap().to_scalar::<f64>().unwrap();
    assert!((loss - expected_loss).abs() < 1e-9 * expected_loss.abs().max(1.0), "{loss} vs {expected_loss}");
}

#[test]
fn llama_matches_the_hugging_face_definition() {
    for kernels in [Kernels::Fused, Kernels::Composed] {
        llama_matches_the_hugging_face_definition_on(kernels);
    }
}

fn llama_matches_the_hugging_face_definition_on(kernels: Kernels) {
    let config = LlamaConfig { initializer_range: 0.3, kernels, ..LlamaConfig::default() };
    let varmap = VarMap::new();
    let model = Llama::new(&config, f64_builder(&varmap)).unwrap();
    randomize(&varmap);
    let ids = [[3u32, 17, 99, 5, 64, 2, 127], [0, 1, 2, 3, 4, 5, 6]];
    let logits = model.forward(&Tensor::new(&ids, &Device::Cpu).unwrap()).unwrap();
    assert_eq!(logits.dims(), [2, 7, 128]);
    // The loss: the mean next-token cross-entropy of those logits.
    let targets = Tensor::new(&[[17u32, 99, 5, 64, 2, 127, 0], [1, 2, 3, 4, 5, 6, 7]], &Device::Cpu).unwrap();
    let loss = model.loss(&Tensor::new(&ids, &Device::Cpu).unwrap(), &targets).unwrap().to_scalar::<f64>().unwrap();
    let rows = logits.reshape((14, 128)).unwrap().to_vec2::<f64>().unwrap();
    let picked = targets.flatten_all().unwrap().to_vec1::<u32>().unwrap();
    let expected_loss = rows
        .iter()
        .zip(&picked)
        .map(|(row, &t)| {
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln() - row[t as usize]
        })
        .sum::<f64>()
        / 14.0;
    assert!((loss - expected_loss).abs() < 1e-10, "{kernels:?}: loss {loss}, by hand {expected_loss}");

    let head_dim = config.hidden_size / config.num_attention_heads;
    let group = config.num_attention_heads / config.num_key_value_heads;
    let rope = |x: &Rows, heads: usize| -> Rows {
        x.iter()
            .enumerate()
            .map(|(pos, row)| {
                let mut out = row.clone();
                for h in 0..heads {
                    let base = h * head_dim;
                    for j in 0..head_dim / 2 {
                        let freq = 1.0 / config.rope_theta.powf((2 * j) as f64 / head_dim as f64);
                        let (sin, cos) = ((pos as f64) * freq).sin_cos();
                        let (a, b) = (row[base + j], row[base + j + head_dim / 2]);
                        out[base + j] = a * cos - b * sin;
                        out[base + j + head_dim / 2] = b * cos + a * sin;
                    }
                }
                out
            })
            .collect()
    };
    let w = |name: &str| matrix(&varmap, name);
    let eps = config.rms_norm_eps;
    for (b, sequence) in ids.iter().enumerate() {
        let embed = w("model.embed_tokens.weight");
        let mut x: Rows = sequence.iter().map(|&id| embed[id as usize].clone()).collect();
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let h = rms_norm(&x, &values(&varmap, &format!("{p}.input_layernorm.weight")), eps);
            let q = rope(&linear(&h, &w(&format!("{p}.self_attn.q_proj.weight")), None), config.num_attention_heads);
            let k = rope(&linear(&h, &w(&format!("{p}.self_attn.k_proj.weight")), None), config.num_key_value_heads);
            let v = linear(&h, &w(&format!("{p}.self_attn.v_proj.weight")), None);
            let a = attention(&q, &k, &v, config.num_attention_heads, head_dim, |h| h / group, true);
            x = add(&x, &linear(&a, &w(&format!("{p}.self_attn.o_proj.weight")), None));
            let h = rms_norm(&x, &values(&varmap, &format!("{p}.post_attention_layernorm.weight")), eps);
            let gate = linear(&h, &w(&format!("{p}.mlp.gate_proj.weight")), None);
            let up = linear(&h, &w(&format!("{p}.mlp.up_proj.weight")), None);
            let act: Rows = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g.iter().zip(u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect())
                .collect();
            x = add(&x, &linear(&act, &w(&format!("{p}.mlp.down_proj.weight")), None));
        }
        let x = rms_norm(&x, &values(&varmap, "model.norm.weight"), eps);
        let expected = linear(&x, &w("lm_head.weight"), None);
        let actual = logits.get(b).unwrap().to_vec2::<f64>().unwrap();
        assert_close(&actual, &expected, 1e-10, &format!("{kernels:?}: sequence {b}"));
    }
}

/// Checks that `loss` (a scalar built from the model's variables) has a gradient for every
/// variable except `no_grad`, none for those, and that sampled entries match central
/// differences.
fn check_gradients(varmap: &VarMap, no_grad: &[&str], loss: impl Fn() -> Tensor) {
    let grads = loss().backward().unwrap();
    let mut names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    names.sort();
    for name in &names {
        let v = var(varmap, name);
        let grad = grads.get(v.as_tensor());
        if no_grad.contains(&name.as_str()) {
            assert!(grad.is_none(), "{name} is a buffer but received a gradient");
            continue;
        }
        let grad = grad.unwrap_or_else(|| panic!("{name} received no gradient"));
        let grad: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
        assert!(grad.iter().any(|g| *g != 0.0), "{name}: all-zero gradient");
        let original: Vec<f64> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let n = original.len();
        for &i in &[0, n / 2, n - 1] {
            // Central differences err by about h²·f''' (truncation) plus eps·|f|/h (rounding).
            // At h = 1e-6 rounding dominated: the Llama check failed 3 runs in 30 (random
            // weights); at 1e-5 none of 60 whole-file runs failed.
            let h = 1e-5;
            let eval = |delta: f64| -> f64 {
                let mut data = original.clone();
                data[i] += delta;
                v.set(&Tensor::from_vec(data, v.as_tensor().shape(), &Device::Cpu).unwrap()).unwrap();
                loss().to_scalar::<f64>().unwrap()
            };
            let numeric = (eval(h) - eval(-h)) / (2.0 * h);
            v.set(&Tensor::from_vec(original.clone(), v.as_tensor().shape(), &Device::Cpu).unwrap()).unwrap();
            assert!(
                (numeric - grad[i]).abs() <= 1e-6 * (1.0 + numeric.abs()),
                "{name}[{i}]: autograd {} vs finite difference {numeric}",
                grad[i]
            );
        }
    }
}

/// `sum(out * r)` for a fixed random `r`, so no gradient vanishes by symmetry.
fn projection(out: &Tensor, r: &Tensor) -> Tensor {
    (out * r).unwrap().sum_all().unwrap()
}

#[test]
fn transformer_gradients() {
    let config = small_transformer_config();
    let varmap = VarMap::new();
    let model = Transformer::new(&config, f64_builder(&varmap)).unwrap();
    randomize(&varmap);
    let src = Tensor::randn(0f64, 1.0, (5, 2, 8), &Device::Cpu).unwrap();
    let tgt = Tensor::randn(0f64, 1.0, (3, 2, 8), &Device::Cpu).unwrap();
    let r = Tensor::randn(0f64, 1.0, (3, 2, 8), &Device::Cpu).unwrap();
    check_gradients(&varmap, &[], || projection(&model.forward(&src, &tgt).unwrap(), &r));
}

#[test]
fn transformer_with_shared_params_gradients() {
    let varmap = VarMap::new();
    let model = TransformerWithSharedParams::new(true, f64_builder(&varmap)).unwrap();
    randomize(&varmap);
    let (src, tgt) = TransformerWithSharedParams::get_input(&Device::Cpu).unwrap();
    // The buffers (and the BatchNorm running statistics) get no gradient.
    let buffers = ["vocab_bias", "long_buffer", "bn.running_mean", "bn.running_var"];
    check_gradients(&varmap, &buffers, || {
        TransformerWithSharedParams::get_loss(&tgt, &model.forward(&src, &tgt).unwrap()).unwrap()
    });
}

#[test]
fn llama_gradients() {
    for kernels in [Kernels::Fused, Kernels::Composed] {
        let config = LlamaConfig { initializer_range: 0.3, num_hidden_layers: 2, kernels, ..LlamaConfig::default() };
        let varmap = VarMap::new();
        let model = Llama::new(&config, f64_builder(&varmap)).unwrap();
        randomize(&varmap);
        // Every token id appears, so every embedding row has a gradient somewhere; the sampled
        // rows (0, middle, last) are among them.
        let ids: Vec<u32> = (0..128).collect();
        let ids = Tensor::from_vec(ids, (4, 32), &Device::Cpu).unwrap();
        let r = Tensor::randn(0f64, 1.0, (4, 32, 128), &Device::Cpu).unwrap();
        check_gradients(&varmap, &[], || projection(&model.forward(&ids).unwrap(), &r));
        // The fused loss (the projection and cross-entropy as one op) too.
        let targets =
            ids.affine(1.0, 1.0).unwrap().broadcast_minimum(&Tensor::new(127u32, &Device::Cpu).unwrap()).unwrap();
        check_gradients(&varmap, &[], || model.loss(&ids, &targets).unwrap());
    }
}

#[test]
fn nested_wrapped_module_gradients() {
    let varmap = VarMap::new();
    let model = NestedWrappedModule::new(f64_builder(&varmap)).unwrap();
    let x = Tensor::rand(0f64, 1.0, (4, 8), &Device::Cpu).unwrap();
    check_gradients(&varmap, &[], || model.forward(&x).unwrap().sum_all().unwrap());
}

/// candle-nn 0.11.1's `Linear` is wrong for a non-contiguous 3-D input (every batch element
/// after the first). The library's models must not depend on their input's layout: a
/// transposed input gives what its contiguous copy gives, and the copy's result is the
/// one checked against PyTorch and against plain loops above.
#[test]
fn models_give_the_same_result_for_a_non_contiguous_input() {
    let varmap = VarMap::new();
    let transformer = Transformer::new(&small_transformer_config(), f64_builder(&varmap)).unwrap();
    randomize(&varmap);
    // (S, N, E) made from a batch-first (N, S, E) tensor, as a caller would.
    let batch_first = |seed: f64, s: usize| {
        Tensor::arange(0.0, (3 * s * 8) as f64, &Device::Cpu)
            .unwrap()
            .affine(0.37, seed)
            .unwrap()
            .sin()
            .unwrap()
            .reshape((3, s, 8))
            .unwrap()
    };
    let src = batch_first(0.1, 5).transpose(0, 1).unwrap();
    let tgt = batch_first(0.7, 4).transpose(0, 1).unwrap();
    assert!(!src.is_contiguous() && !tgt.is_contiguous());
    let strided = transformer.forward(&src, &tgt).unwrap();
    let contiguous = transformer.forward(&src.contiguous().unwrap(), &tgt.contiguous().unwrap()).unwrap();
    let diff = (strided - contiguous).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f64>().unwrap() < 1e-12, "transformer: {diff}");

    let varmap = VarMap::new();
    let nested = NestedWrappedModule::new(f64_builder(&varmap)).unwrap();
    let x = batch_first(0.3, 8).narrow(1, 0, 8).unwrap().get(0).unwrap().t().unwrap();
    assert!(!x.is_contiguous());
    let diff = (nested.forward(&x).unwrap() - nested.forward(&x.contiguous().unwrap()).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(diff.to_scalar::<f64>().unwrap() < 1e-12, "NestedWrappedModule: {diff}");
}
