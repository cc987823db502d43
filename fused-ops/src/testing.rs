//! What the ops' tests share: seeded inputs, a tolerance relative to the tensor's scale,
//! and the gradients of `sum(y · dy)`.

use candle_core::{DType, Device, Result, Tensor, Var};

/// Standard-normal-ish values from a fixed seed (a hash of the seed and the index through
/// the Box-Muller transform): the same on every run and machine.
pub fn randn(seed: u64, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let uniform = |i: u64| {
        let mut z = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(i.wrapping_mul(0xbf58_476d_1ce4_e5b9));
        z = (z ^ (z >> 30)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let values: Vec<f32> = (0..n as u64)
        .map(|i| {
            let (u, v) = (uniform(2 * i), uniform(2 * i + 1));
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).expect("shape and length agree")
}

/// `max |a − b| ≤ tolerance · max(max |b|, 0.01)` (in f64): equal up to `tolerance`
/// relative to the reference's scale (a reference of nearly nothing, such as the exact
/// zero gradient of a one-element softmax, is measured against 0.01).
pub fn assert_close(a: &Tensor, b: &Tensor, tolerance: f64, what: &str) -> Result<()> {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let (a, b) = (a.to_dtype(DType::F64)?.flatten_all()?, b.to_dtype(DType::F64)?.flatten_all()?);
    let difference = (&a - &b)?.abs()?.max(0)?.to_scalar::<f64>()?;
    let scale = b.abs()?.max(0)?.to_scalar::<f64>()?.max(0.01);
    assert!(
        difference <= tolerance * scale,
        "{what}: differs by {difference:.3e}, {:.3e} of the reference's scale {scale:.3e} (tolerance {tolerance:.1e})",
        difference / scale
    );
    Ok(())
}

/// The gradients of `sum(y · dy)` with respect to `vars`, in order (zeros for one that
/// gets none).
pub fn grads_of(y: &Tensor, dy: &Tensor, vars: &[&Var]) -> Result<Vec<Tensor>> {
    let grads = (y * dy.to_dtype(y.dtype())?)?.sum_all()?.backward()?;
    vars.iter()
        .map(|v| match grads.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => v.as_tensor().zeros_like(),
        })
        .collect()
}
