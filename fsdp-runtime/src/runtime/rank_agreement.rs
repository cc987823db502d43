//! The wrap-time check that every rank of a group built the same model: the same world
//! size, the same units, and the same tensors (names, roles, dtypes, shapes) in the same
//! order. A mismatch would otherwise surface later as a failed or mismatched collective,
//! or not at all (two parameters of equal size but transposed shapes train silently
//! wrong). Every rank gets the same error, naming the first tensor that differs and what
//! each side has.

use super::seeded_init::fnv1a;
use crate::error::ConfigError;
use crate::error::{Error, Result};
use crate::model::Layout;
use candle_core::Tensor;
use fsdp_comm::Collectives;

/// One line per unit and per tensor, in layout order: what must agree across ranks.
fn describe(layout: &Layout) -> Vec<String> {
    let units = layout.units.iter().map(|u| format!("unit `{}`", u.display_name()));
    let tensors = layout
        .params
        .iter()
        .map(|p| format!("`{}` ({:?}, {:?}, {:?})", p.fqn, p.role, p.tensor.dtype(), p.tensor.dims()));
    units.chain(tensors).collect()
}

/// FNV-1a, cut to 52 bits so that an `f64` carries it exactly: a fingerprint that is the
/// same in every process.
fn fingerprint(text: &str) -> f64 {
    (fnv1a(text) & ((1 << 52) - 1)) as f64
}

/// Refuses to wrap when the ranks of `comm` disagree on the world size or on the model.
/// A collective: every rank of the group calls it.
pub(crate) fn check_ranks_agree(comm: &dyn Collectives, layout: &Layout) -> Result<()> {
    // On the backend's device: a GPU backend moves device buffers only.
    let device = comm.device();
    let gather = |values: &[f64], what: &str| -> Result<Vec<Vec<f64>>> {
        let mine = Tensor::new(values, &device)?;
        let label = format!("the wrap-time check that all ranks agree ({what})");
        let all = comm.all_gather(&mine, &label)?.wait()?.to_vec1::<f64>()?;
        Ok(all.chunks(values.len()).map(<[f64]>::to_vec).collect())
    };
    let disagree = |detail: String| Error::Config(ConfigError::RanksDisagree { rank: comm.global_rank(), detail });

    // Counts first: the later exchanges need every rank to send as many values.
    let lines = describe(layout);
    let trained: usize = layout.params.iter().map(|p| p.tensor.elem_count()).sum();
    let counts = [comm.size() as f64, layout.units.len() as f64, layout.params.len() as f64, trained as f64];
    let all_counts = gather(&counts, "sizes")?;
    let show = |c: &[f64]| format!("world size {}, {} units, {} tensors, {} elements", c[0], c[1], c[2], c[3]);
    if let Some((rank, theirs)) = all_counts.iter().enumerate().find(|(_, c)| *c != &all_counts[0]) {
        return Err(disagree(format!(
            "group rank 0 has {} but group rank {rank} has {}",
            show(&all_counts[0]),
            show(theirs)
        )));
    }

    let prints: Vec<f64> = lines.iter().map(|line| fingerprint(line)).collect();
    let all_prints = gather(&prints, "names, dtypes and shapes")?;
    let first_difference = (0..prints.len()).find(|&i| all_prints.iter().any(|p| p[i] != all_prints[0][i]));
    let Some(index) = first_difference else {
        return Ok(());
    };
    // Every rank found the same index: exchange the lines there so the message shows both.
    let line_len = [lines[index].len() as f64];
    let longest =
        gather(&line_len, "the length of the first difference")?.iter().map(|l| l[0] as usize).max().unwrap_or(0);
    let mut codes: Vec<f64> = lines[index].bytes().map(f64::from).collect();
    codes.resize(longest, 0.0);
    let all_lines: Vec<String> = gather(&codes, "the first difference")?
        .iter()
        .map(|codes| {
            let bytes: Vec<u8> = codes.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        })
        .collect();
    let rank = (0..all_lines.len()).find(|&r| all_prints[r][index] != all_prints[0][index]).expect("a rank differs");
    Err(disagree(format!(
        "entry {index} of the model: group rank 0 has {} where group rank {rank} has {}",
        all_lines[0], all_lines[rank]
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_fit_an_f64_and_tell_transposed_shapes_apart() {
        let a = fingerprint("`w` (Parameter, F32, [4, 8])");
        let b = fingerprint("`w` (Parameter, F32, [8, 4])");
        assert_ne!(a, b);
        assert!(a < (1u64 << 52) as f64 && a.fract() == 0.0);
        // FNV-1a's published value for "a", cut to 52 bits.
        assert_eq!(fingerprint("a"), (0xaf63_dc4c_8601_ec8c_u64 & ((1 << 52) - 1)) as f64);
    }
}
