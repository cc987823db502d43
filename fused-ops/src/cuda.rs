//! The CUDA side of the ops (feature `cuda`): the kernels of `kernels/fused_ops.cu`, built
//! to PTX by `build.rs` and loaded once per device, and the matrix products of `linear`
//! and `linear_cross_entropy` on cuBLAS through candle's own `matmul`.
//!
//! Every kernel reads contiguous inputs (the ops' wrappers make them so) and writes
//! outputs allocated here; a kernel's launch shape follows its comment in the `.cu` file.

use crate::adamw_step::AdamWStep;
use crate::op_error;
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor, WithDType};
use half::{bf16, f16};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused_ops.ptx"));
const MODULE: &str = "candle_fused_ops";
/// Threads of a block: a multiple of 32.
const THREADS: u32 = 256;
/// Query rows per block of the attention kernels (one warp each).
const ROWS_PER_BLOCK: u32 = 4;
/// The head dimensions the attention kernels take (8 values a lane).
const MAX_HEAD_DIM: usize = 256;

/// An element type with a kernel: its accumulator (float, or double for f64).
trait Kernel: WithDType + CudaDType + DeviceRepr + ValidAsZeroBits {
    type Acc: DeviceRepr + ValidAsZeroBits + WithDType + CudaDType;
}
impl Kernel for f32 {
    type Acc = f32;
}
impl Kernel for f64 {
    type Acc = f64;
}
impl Kernel for f16 {
    type Acc = f32;
}
impl Kernel for bf16 {
    type Acc = f32;
}

/// Calls `$f::<T>(args)` for the dtype, or fails naming the op.
macro_rules! for_float {
    ($op:expr, $dtype:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            other => Err(crate::unsupported_dtype($op, other)),
        }
    };
}

/// Kernel `root` for element type `T`.
fn kernel<T: WithDType>(device: &CudaDevice, root: &str) -> Result<CudaFunction> {
    let name = format!("{root}_{}", T::DTYPE.as_str());
    Ok(device.get_or_load_custom_func(&name, MODULE, PTX)?.into_cuda_function())
}

/// The elements of a contiguous storage under its layout.
fn view<'a, T: CudaDType>(op: &str, storage: &'a CudaStorage, layout: &Layout) -> Result<CudaView<'a, T>> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| op_error(op, format!("needs contiguous inputs, got the layout {layout:?}")))?;
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

/// `n` elements the kernel writes before anyone reads them.
fn output<T: DeviceRepr>(device: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every caller launches a kernel that writes all `n` elements.
    unsafe { device.alloc::<T>(n.max(1)) }
}

fn rows_launch(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

fn elementwise_launch(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

fn warp_rows_launch(rows: usize) -> LaunchConfig {
    let blocks = rows.div_ceil(ROWS_PER_BLOCK as usize).max(1) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (32 * ROWS_PER_BLOCK, 1, 1), shared_mem_bytes: 0 }
}

fn wrap<T: CudaDType>(slice: CudaSlice<T>, device: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(slice, device.clone())
}

/// The CUDA storage of a tensor an op holds.
fn held<'a>(op: &str, storage: &'a Storage) -> Result<&'a CudaStorage> {
    match storage {
        Storage::Cuda(cuda) => Ok(cuda),
        _ => Err(op_error(op, "the tensors it holds must be on the inputs' GPU".into())),
    }
}

// ---- RMSNorm -------------------------------------------------------------------------

pub(crate) fn rms_norm_forward(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    fn go<T: Kernel>(x: &CudaStorage, lx: &Layout, w: &CudaStorage, lw: &Layout, eps: f64) -> Result<CudaStorage> {
        let device = x.device();
        let (xs, ws) = (view::<T>("rms_norm", x, lx)?, view::<T>("rms_norm", w, lw)?);
        let n = lw.shape().elem_count();
        let rows = lx.shape().elem_count() / n.max(1);
        let mut y = output::<T>(device, rows * n)?;
        let func = kernel::<T>(device, "rms_norm_fwd")?;
        let n32 = n as u32;
        let stream = device.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        launch.arg(&xs).arg(&ws).arg(&mut y).arg(&n32).arg(&eps);
        // SAFETY: the kernel reads `rows × n` and `n` elements, writes `rows × n`.
        unsafe { launch.launch(rows_launch(rows)) }.w()?;
        Ok(wrap(y, device))
    }
    Ok((for_float!("rms_norm", x.dtype(), go(x, lx, w, lw, eps))?, lx.shape().clone()))
}

pub(crate) fn rms_norm_backward(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    fn go<T: Kernel>(
        (x, lx): (&CudaStorage, &Layout),
        (w, lw): (&CudaStorage, &Layout),
        (dy, ldy): (&CudaStorage, &Layout),
        eps: f64,
    ) -> Result<CudaStorage> {
        let device = x.device();
        let (xs, ws, dys) =
            (view::<T>("rms_norm", x, lx)?, view::<T>("rms_norm", w, lw)?, view::<T>("rms_norm", dy, ldy)?);
        let n = lw.shape().elem_count();
        let rows = lx.shape().elem_count() / n.max(1);
        let mut grads = output::<T>(device, rows * n + n)?;
        let mut dw_acc = device.alloc_zeros::<T::Acc>(n.max(1))?;
        let n32 = n as u32;
        {
            let (mut dx, mut dw) = grads.split_at_mut(rows * n);
            let func = kernel::<T>(device, "rms_norm_bwd")?;
            let stream = device.cuda_stream();
            let mut launch = stream.launch_builder(&func);
            launch.arg(&xs).arg(&ws).arg(&dys).arg(&mut dx).arg(&mut dw_acc).arg(&n32).arg(&eps);
            // SAFETY: as the forward, plus `n` accumulators added into.
            unsafe { launch.launch(rows_launch(rows)) }.w()?;
            let func = kernel::<T>(device, "convert")?;
            let stream = device.cuda_stream();
            let mut launch = stream.launch_builder(&func);
            let count = n;
            launch.arg(&dw_acc).arg(&mut dw).arg(&count);
            // SAFETY: `n` accumulators converted into the `n` last elements.
            unsafe { launch.launch(elementwise_launch(n)) }.w()?;
        }
        Ok(wrap(grads, device))
    }
    let grads = for_float!("rms_norm", x.dtype(), go((x, lx), (w, lw), (dy, ldy), eps))?;
    Ok((grads, Shape::from(lx.shape().elem_count() + lw.shape().elem_count())))
}

// ---- SwiGLU --------------------------------------------------------------------------

pub(crate) fn swiglu_forward(
    g: &CudaStorage,
    lg: &Layout,
    u: &CudaStorage,
    lu: &Layout,
) -> Result<(CudaStorage, Shape)> {
    fn go<T: Kernel>(g: &CudaStorage, lg: &Layout, u: &CudaStorage, lu: &Layout) -> Result<CudaStorage> {
        let device = g.device();
        let (gs, us) = (view::<T>("swiglu", g, lg)?, view::<T>("swiglu", u, lu)?);
        let n = lg.shape().elem_count();
        let mut h = output::<T>(device, n)?;
        let func = kernel::<T>(device, "swiglu_fwd")?;
        let stream = device.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        launch.arg(&gs).arg(&us).arg(&mut h).arg(&n);
        // SAFETY: `n` elements read from each input, written to the output.
        unsafe { launch.launch(elementwise_launch(n)) }.w()?;
        Ok(wrap(h, device))
    }
    Ok((for_float!("swiglu", g.dtype(), go(g, lg, u, lu))?, lg.shape().clone()))
}

pub(crate) fn swiglu_backward(
    g: &CudaStorage,
    lg: &Layout,
    u: &CudaStorage,
    lu: &Layout,
    dh: &CudaStorage,
    ldh: &Layout,
) -> Result<(CudaStorage, Shape)> {
    fn go<T: Kernel>(
        (g, lg): (&CudaStorage, &Layout),
        (u, lu): (&CudaStorage, &Layout),
        (dh, ldh): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let device = g.device();
        let (gs, us, dhs) = (view::<T>("swiglu", g, lg)?, view::<T>("swiglu", u, lu)?, view::<T>("swiglu", dh, ldh)?);
        let n = lg.shape().elem_count();
        let mut grads = output::<T>(device, 2 * n)?;
        {
            let (mut dg, mut du) = grads.split_at_mut(n);
            let func = kernel::<T>(device, "swiglu_bwd")?;
            let stream = device.cuda_stream();
            let mut launch = stream.launch_builder(&func);
            launch.arg(&gs).arg(&us).arg(&dhs).arg(&mut dg).arg(&mut du).arg(&n);
            // SAFETY: `n` elements read from each input, written to each half.
            unsafe { launch.launch(elementwise_launch(n)) }.w()?;
        }
        Ok(wrap(grads, device))
    }
    let grads = for_float!("swiglu", g.dtype(), go((g, lg), (u, lu), (dh, ldh)))?;
    Ok((grads, Shape::from(2 * lg.shape().elem_count())))
}

// ---- RoPE ----------------------------------------------------------------------------

pub(crate) fn rope(
    x: &CudaStorage,
    lx: &Layout,
    cos: &CudaStorage,
    lc: &Layout,
    sin: &CudaStorage,
    ls: &Layout,
    inverse: bool,
) -> Result<(CudaStorage, Shape)> {
    fn go<T: Kernel>(
        (x, lx): (&CudaStorage, &Layout),
        (cos, lc): (&CudaStorage, &Layout),
        (sin, ls): (&CudaStorage, &Layout),
        inverse: bool,
    ) -> Result<CudaStorage> {
        let device = x.device();
        let (xs, cs, ss) = (view::<T>("rope", x, lx)?, view::<T>("rope", cos, lc)?, view::<T>("rope", sin, ls)?);
        let dims = lx.dims();
        let (seq, heads, dim) = (dims[1] as u32, dims[2] as u32, dims[3] as u32);
        let pairs = lx.shape().elem_count() / 2;
        let mut y = output::<T>(device, 2 * pairs)?;
        let func = kernel::<T>(device, "rope")?;
        let inverse = i32::from(inverse);
        let stream = device.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        launch.arg(&xs).arg(&cs).arg(&ss).arg(&mut y).arg(&seq).arg(&heads).arg(&dim).arg(&pairs).arg(&inverse);
        // SAFETY: every pair of `x` read and written once; the tables hold `seq × dim/2`.
        unsafe { launch.launch(elementwise_launch(pairs)) }.w()?;
        Ok(wrap(y, device))
    }
    Ok((for_float!("rope", x.dtype(), go((x, lx), (cos, lc), (sin, ls), inverse))?, lx.shape().clone()))
}

// ---- Cross-entropy -------------------------------------------------------------------

/// The targets, checked on the host to lie in `0..classes` (a kernel must not index past
/// a row), as a view of the device's u32s.
fn checked_targets<'a>(op: &str, t: &'a CudaStorage, lt: &Layout, classes: usize) -> Result<CudaView<'a, u32>> {
    if t.dtype() != DType::U32 {
        return Err(op_error(op, format!("targets on the GPU must be u32, got {:?}", t.dtype())));
    }
    let targets = view::<u32>(op, t, lt)?;
    let host = t.device().cuda_stream().clone_dtoh(&targets).w()?;
    if let Some((row, &target)) = host.iter().enumerate().find(|(_, &target)| target as usize >= classes) {
        return Err(op_error(op, format!("the target of row {row} is {target}, outside the {classes} classes")));
    }
    Ok(targets)
}

/// Adds each row's loss into `total` and turns `logits` (`rows × classes`, a chunk of
/// `all_rows`) into their gradient `(softmax − onehot) · scale / all_rows` in place.
fn loss_and_gradient<T: Kernel>(
    device: &CudaDevice,
    logits: &mut CudaSlice<T>,
    targets: &CudaView<'_, u32>,
    (rows, classes, all_rows): (usize, usize, usize),
    total: &mut CudaSlice<T::Acc>,
    scale: &CudaSlice<T>,
) -> Result<()> {
    let (classes, all_rows) = (classes as u32, all_rows as u32);
    let stream = device.cuda_stream();
    let func = kernel::<T>(device, "cross_entropy_fwd")?;
    let mut launch = stream.launch_builder(&func);
    launch.arg(&*logits).arg(targets).arg(total).arg(&classes);
    // SAFETY: `rows × classes` logits and `rows` checked targets read; one scalar added into.
    unsafe { launch.launch(rows_launch(rows)) }.w()?;
    let func = kernel::<T>(device, "cross_entropy_bwd_inplace")?;
    let mut launch = stream.launch_builder(&func);
    launch.arg(logits).arg(targets).arg(scale).arg(&classes).arg(&all_rows);
    // SAFETY: each thread reads an element before it writes the same element (in place).
    unsafe { launch.launch(rows_launch(rows)) }.w()?;
    Ok(())
}

pub(crate) fn cross_entropy_forward(
    z: &CudaStorage,
    lz: &Layout,
    t: &CudaStorage,
    lt: &Layout,
) -> Result<(CudaStorage, Shape)> {
    fn go<T: Kernel>(z: &CudaStorage, lz: &Layout, t: &CudaStorage, lt: &Layout) -> Result<CudaStorage> {
        let device = z.device();
        let (rows, classes) = (lz.dims()[0], lz.dims()[1]);
        let (zs, targets) = (view::<T>("cross_entropy", z, lz)?, checked_targets("cross_entropy", t, lt, classes)?);
        let mut total = device.alloc_zeros::<T::Acc>(1)?;
        let classes32 = classes as u32;
        let func = kernel::<T>(device, "cross_entropy_fwd")?;
        let stream = device.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        launch.arg(&zs).arg(&targets).arg(&mut total).arg(&classes32);
        // SAFETY: `rows × classes` logits and `rows` checked targets read.
        unsafe { launch.launch(rows_launch(rows)) }.w()?;
        mean::<T>(device, &total, rows)
    }
    Ok((for_float!("cross_entropy", z.dtype(), go(z, lz, t, lt))?, Shape::from(())))
}

/// `total / rows` as a scalar of `T`.
fn mean<T: Kernel>(device: &CudaDevice, total: &CudaSlice<T::Acc>, rows: usize) -> Result<CudaStorage> {
    let mut loss = output::<T>(device, 1)?;
    let func = kernel::<T>(device, "cross_entropy_mean")?;
    let rows = rows as u32;
    let stream = device.cuda_stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(total).arg(&mut loss).arg(&rows);
    // SAFETY: one scalar read, one written.
    unsafe { launch.launch(elementwise_launch(1)) }.w()?;
    Ok(wrap(loss, device))
}

pub(crate) fn cross_entropy_backward(
    z: &CudaStorage,
    lz: &Layout,
    t: &CudaStorage,
    lt: &Layout,
    g: &CudaStorage,
    lg: &Layout,
) -> Result<(CudaStorage, Shape)> {
    fn go<T: Kernel>(
        (z, lz): (&CudaStorage, &Layout),
        (t, lt): (&CudaStorage, &Layout),
        (g, lg): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let device = z.device();
        let (rows, classes) = (lz.dims()[0], lz.dims()[1]);
        let (zs, targets) = (view::<T>("cross_entropy", z, lz)?, checked_targets("cross_entropy", t, lt, classes)?);
        let scale = view::<T>("cross_entropy", g, lg)?;
        let mut dz = output::<T>(device, rows * classes)?;
        let (classes32, rows32) = (classes as u32, rows as u32);
        let func = kernel::<T>(device, "cross_entropy_bwd")?;
        let stream = device.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        launch.arg(&zs).arg(&targets).arg(&scale).arg(&mut dz).arg(&classes32).arg(&rows32);
        // SAFETY: `rows × classes` read and written, one scalar read.
        unsafe { launch.launch(rows_launch(rows)) }.w()?;
        Ok(wrap(dz, device))
    }
    Ok((for_float!("cross_entropy", z.dtype(), go((z, lz), (t, lt), (g, lg)))?, lz.shape().clone()))
}

/// `a · b` by candle's cuBLAS product: `a` `(m, k)` and `b` `(k, n)` as their layouts
/// say (either may be a transposed view).
fn product(a: &CudaStorage, la: &Layout, b: &CudaStorage, lb: &Layout) -> Result<CudaStorage> {
    let (m, k) = (la.dims()[0], la.dims()[1]);
    let n = lb.dims()[1];
    let batched = |l: &Layout| -> Result<Layout> {
        let (rows, cols) = (l.dims()[0], l.dims()[1]);
        let strides = l.stride();
        Ok(Layout::new(Shape::from((1, rows, cols)), vec![rows * cols, strides[0], strides[1]], l.start_offset()))
    };
    a.matmul(b, (1, m, n, k), &batched(la)?, &batched(lb)?)
}

/// A row-major `(rows, cols)` layout at `offset`.
fn matrix(rows: usize, cols: usize, offset: usize) -> Layout {
    Layout::contiguous_with_offset((rows, cols), offset)
}

/// Copies `from` (contiguous) into `to` at element `offset`.
fn copy_into(from: &CudaStorage, count: usize, to: &mut CudaStorage, offset: usize) -> Result<()> {
    from.copy_strided_src(to, offset, &Layout::contiguous(count))
}

pub(crate) fn linear_forward(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (output, input) = (lw.dims()[0], lw.dims()[1]);
    let rows = lx.shape().elem_count() / input.max(1);
    let weight_t = matrix(output, input, lw.start_offset()).transpose(0, 1)?;
    let y = product(x, &matrix(rows, input, lx.start_offset()), w, &weight_t)?;
    let mut dims = lx.dims().to_vec();
    *dims.last_mut().expect("not a scalar") = output;
    Ok((y, Shape::from(dims)))
}

pub(crate) fn linear_backward(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (output, input) = (lw.dims()[0], lw.dims()[1]);
    let rows = lx.shape().elem_count() / input.max(1);
    let dy_matrix = matrix(rows, output, ldy.start_offset());
    let dx = product(dy, &dy_matrix, w, &matrix(output, input, lw.start_offset()))?;
    let dw = product(dy, &dy_matrix.transpose(0, 1)?, x, &matrix(rows, input, lx.start_offset()))?;
    let total = rows * input + output * input;
    // SAFETY: both halves are written by the copies below.
    let mut grads = unsafe { x.device().alloc_uninit(&Shape::from(total), x.dtype())? };
    copy_into(&dx, rows * input, &mut grads, 0)?;
    copy_into(&dw, output * input, &mut grads, rows * input)?;
    Ok((grads, Shape::from(total)))
}

/// The loss, and the gradients of the hidden states and of the weight for a unit loss,
/// a chunk of rows at a time (at most 2^26 logits of a chunk alive).
pub(crate) fn linear_cross_entropy(
    h: &CudaStorage,
    lh: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    t: &CudaStorage,
    lt: &Layout,
) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    fn go<T: Kernel>(
        (h, lh): (&CudaStorage, &Layout),
        (w, lw): (&CudaStorage, &Layout),
        (t, lt): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
        let device = h.device();
        let (rows, dim) = (lh.dims()[0], lh.dims()[1]);
        let classes = lw.dims()[0];
        let targets = checked_targets("linear_cross_entropy", t, lt, classes)?;
        let mut total = device.alloc_zeros::<T::Acc>(1)?;
        let one = device.cuda_stream().clone_htod(&[T::from_f64(1.0)]).w()?;
        // SAFETY: every chunk's rows of `dh` are copied in below.
        let mut dh = unsafe { device.alloc_uninit(&Shape::from(rows * dim), T::DTYPE)? };
        let mut dw: Option<CudaStorage> = None;
        let weight = matrix(classes, dim, lw.start_offset());
        let step = ((1usize << 26) / classes.max(1)).max(1);
        for start in (0..rows).step_by(step) {
            let n = step.min(rows - start);
            let hidden = matrix(n, dim, lh.start_offset() + start * dim);
            let mut logits = product(h, &hidden, w, &weight.transpose(0, 1)?)?;
            {
                let slice = logits.as_cuda_slice_mut::<T>()?;
                let chunk_targets = targets.slice(start..start + n);
                loss_and_gradient::<T>(device, slice, &chunk_targets, (n, classes, rows), &mut total, &one)?;
            }
            let grad = matrix(n, classes, 0);
            let dh_chunk = product(&logits, &grad, w, &weight)?;
            copy_into(&dh_chunk, n * dim, &mut dh, start * dim)?;
            let dw_chunk = product(&logits, &grad.transpose(0, 1)?, h, &hidden)?;
            dw = Some(match dw {
                None => dw_chunk,
                Some(sum) => {
                    let l = Layout::contiguous(classes * dim);
                    sum.binary_impl::<candle_core::op::Add>(&dw_chunk, &l, &l)?
                }
            });
        }
        let dw = match dw {
            Some(dw) => dw,
            None => device.zeros_impl(&Shape::from(classes * dim), T::DTYPE)?,
        };
        Ok((mean::<T>(device, &total, rows)?, dh, dw))
    }
    for_float!("linear_cross_entropy", h.dtype(), go((h, lh), (w, lw), (t, lt)))
}

// ---- Causal attention ----------------------------------------------------------------

/// `(batch, seq, heads, kv_heads, dim)`, the head dimension checked against the kernels'.
fn attention_dims(lq: &Layout, lk: &Layout) -> Result<(u32, u32, u32, u32, u32)> {
    let (q, k) = (lq.dims(), lk.dims());
    if q[3] > MAX_HEAD_DIM {
        return Err(op_error("causal_attention", format!("head_dim {} (at most {MAX_HEAD_DIM} on the GPU)", q[3])));
    }
    Ok((q[0] as u32, q[1] as u32, q[2] as u32, k[2] as u32, q[3] as u32))
}

pub(crate) fn attention_forward(
    q: &CudaStorage,
    lq: &Layout,
    k: &CudaStorage,
    lk: &Layout,
    v: &CudaStorage,
    lv: &Layout,
    scale: f64,
) -> Result<(CudaStorage, Shape)> {
    fn go<T: Kernel>(
        (q, lq): (&CudaStorage, &Layout),
        (k, lk): (&CudaStorage, &Layout),
        (v, lv): (&CudaStorage, &Layout),
        scale: f64,
    ) -> Result<CudaStorage> {
        let device = q.device();
        let op = "causal_attention";
        let (qs, ks, vs) = (view::<T>(op, q, lq)?, view::<T>(op, k, lk)?, view::<T>(op, v, lv)?);
        let (batch, seq, heads, kv_heads, dim) = attention_dims(lq, lk)?;
        let mut o = output::<T>(device, lq.shape().elem_count())?;
        let func = kernel::<T>(device, "attention_fwd")?;
        let stream = device.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(&qs)
            .arg(&ks)
            .arg(&vs)
            .arg(&mut o)
            .arg(&batch)
            .arg(&seq)
            .arg(&heads)
            .arg(&kv_heads)
            .arg(&dim)
            .arg(&scale);
        // SAFETY: one warp per (batch, head, row) reads its row and keys 0..=row, writes its row.
        unsafe { launch.launch(warp_rows_launch((batch * heads * seq) as usize)) }.w()?;
        Ok(wrap(o, device))
    }
    Ok((for_float!("causal_attention", q.dtype(), go((q, lq), (k, lk), (v, lv), scale))?, lq.shape().clone()))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward(
    q: &CudaStorage,
    lq: &Layout,
    k: &CudaStorage,
    lk: &Layout,
    v: &CudaStorage,
    lv: &Layout,
    out: &Tensor,
    dout: &Tensor,
    scale: f64,
) -> Result<(CudaStorage, Shape)> {
    fn go<T: Kernel>(
        (q, lq): (&CudaStorage, &Layout),
        (k, lk): (&CudaStorage, &Layout),
        (v, lv): (&CudaStorage, &Layout),
        (out, dout): (&Tensor, &Tensor),
        scale: f64,
    ) -> Result<CudaStorage> {
        let device = q.device();
        let op = "causal_attention";
        let (qs, ks, vs) = (view::<T>(op, q, lq)?, view::<T>(op, k, lk)?, view::<T>(op, v, lv)?);
        let (o_storage, lo) = out.storage_and_layout();
        let (do_storage, ldo) = dout.storage_and_layout();
        let os = view::<T>(op, held(op, &o_storage)?, lo)?;
        let dos = view::<T>(op, held(op, &do_storage)?, ldo)?;
        let (batch, seq, heads, kv_heads, dim) = attention_dims(lq, lk)?;
        let rows = (batch * heads * seq) as usize;
        let (q_len, kv_len) = (lq.shape().elem_count(), lk.shape().elem_count());
        let mut lse = output::<f32>(device, rows)?;
        let mut delta = output::<f32>(device, rows)?;
        let func = kernel::<T>(device, "attention_bwd_rows")?;
        let stream = device.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        launch.arg(&qs).arg(&ks).arg(&os).arg(&dos).arg(&mut lse).arg(&mut delta);
        launch.arg(&batch).arg(&seq).arg(&heads).arg(&kv_heads).arg(&dim).arg(&scale);
        // SAFETY: one warp per query row writes its log-sum-exp and D.
        unsafe { launch.launch(warp_rows_launch(rows)) }.w()?;
        let mut grads = output::<T>(device, q_len + 2 * kv_len)?;
        {
            let (mut dq, mut dkv) = grads.split_at_mut(q_len);
            let func = kernel::<T>(device, "attention_bwd_dq")?;
            let stream = device.cuda_stream();
            let mut launch = stream.launch_builder(&func);
            launch.arg(&qs).arg(&ks).arg(&vs).arg(&dos).arg(&lse).arg(&delta).arg(&mut dq);
            launch.arg(&batch).arg(&seq).arg(&heads).arg(&kv_heads).arg(&dim).arg(&scale);
            // SAFETY: one warp per query row writes its row of dq.
            unsafe { launch.launch(warp_rows_launch(rows)) }.w()?;
            let (mut dk, mut dv) = dkv.split_at_mut(kv_len);
            let func = kernel::<T>(device, "attention_bwd_dkv")?;
            let stream = device.cuda_stream();
            let mut launch = stream.launch_builder(&func);
            launch.arg(&qs).arg(&ks).arg(&vs).arg(&dos).arg(&lse).arg(&delta).arg(&mut dk).arg(&mut dv);
            launch.arg(&batch).arg(&seq).arg(&heads).arg(&kv_heads).arg(&dim).arg(&scale);
            // SAFETY: one warp per key row writes its rows of dk and dv.
            unsafe { launch.launch(warp_rows_launch((batch * kv_heads * seq) as usize)) }.w()?;
        }
        Ok(wrap(grads, device))
    }
    let grads = for_float!("causal_attention", q.dtype(), go((q, lq), (k, lk), (v, lv), (out, dout), scale))?;
    Ok((grads, Shape::from(lq.shape().elem_count() + 2 * lk.shape().elem_count())))
}

// ---- AdamW ---------------------------------------------------------------------------

pub(crate) fn adamw_moment(
    s: &mut CudaStorage,
    ls: &Layout,
    g: &CudaStorage,
    lg: &Layout,
    beta: f64,
    squared: bool,
) -> Result<()> {
    fn go<T: Kernel>(
        s: &mut CudaStorage,
        ls: &Layout,
        g: &CudaStorage,
        lg: &Layout,
        beta: f64,
        squared: bool,
    ) -> Result<()> {
        let device = s.device().clone();
        let gs = view::<T>("adamw", g, lg)?;
        let (start, end) = ls.contiguous_offsets().ok_or_else(|| op_error("adamw", "a strided moment".into()))?;
        let n = end - start;
        let mut moment = s.as_cuda_slice_mut::<T>()?.slice_mut(start..end);
        let func = kernel::<T>(&device, "adamw_moment")?;
        let squared = i32::from(squared);
        let stream = device.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        launch.arg(&mut moment).arg(&gs).arg(&n).arg(&beta).arg(&squared);
        // SAFETY: `n` elements updated in place from `n` gradients.
        unsafe { launch.launch(elementwise_launch(n)) }.w()?;
        Ok(())
    }
    match s.dtype() {
        DType::F32 => go::<f32>(s, ls, g, lg, beta, squared),
        DType::F64 => go::<f64>(s, ls, g, lg, beta, squared),
        other => Err(crate::unsupported_dtype("adamw", other)),
    }
}

pub(crate) fn adamw_parameter(
    theta: &mut CudaStorage,
    lt: &Layout,
    m: &CudaStorage,
    lm: &Layout,
    v: &CudaStorage,
    lv: &Layout,
    step: &AdamWStep,
) -> Result<()> {
    fn go<T: Kernel>(
        theta: &mut CudaStorage,
        lt: &Layout,
        (m, lm): (&CudaStorage, &Layout),
        (v, lv): (&CudaStorage, &Layout),
        step: &AdamWStep,
    ) -> Result<()> {
        let device = theta.device().clone();
        let (ms, vs) = (view::<T>("adamw", m, lm)?, view::<T>("adamw", v, lv)?);
        let (start, end) = lt.contiguous_offsets().ok_or_else(|| op_error("adamw", "a strided parameter".into()))?;
        let n = end - start;
        let mut values = theta.as_cuda_slice_mut::<T>()?.slice_mut(start..end);
        let func = kernel::<T>(&device, "adamw_parameter")?;
        let stream = device.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        launch.arg(&mut values).arg(&ms).arg(&vs).arg(&n);
        launch.arg(&step.lr).arg(&step.eps).arg(&step.weight_decay).arg(&step.scale_m).arg(&step.scale_v);
        // SAFETY: `n` parameters updated in place from `n` elements of each moment.
        unsafe { launch.launch(elementwise_launch(n)) }.w()?;
        Ok(())
    }
    match theta.dtype() {
        DType::F32 => go::<f32>(theta, lt, (m, lm), (v, lv), step),
        DType::F64 => go::<f64>(theta, lt, (m, lm), (v, lv), step),
        other => Err(crate::unsupported_dtype("adamw", other)),
    }
}
