//! Which unit a prefetch targets, as PyTorch FSDP1 chooses (`_get_handle_to_prefetch`); the executor and
//! the plan both ask here.

/// The unit prefetched in backward when `unit`'s backward starts: the one that ended its
/// forward just before `unit` did (`post_forward_order`: units in the order their forward
/// ended). `None` for the first unit to end its forward.
pub(crate) fn backward_prefetch_target(post_forward_order: &[usize], unit: usize) -> Option<usize> {
    let position = post_forward_order.iter().position(|&u| u == unit)?;
    position.checked_sub(1).map(|p| post_forward_order[p])
}

/// The unit prefetched in forward when `unit`'s forward starts: the next to start in
/// `forward_order`.
pub(crate) fn forward_prefetch_target(forward_order: &[usize], unit: usize) -> Option<usize> {
    let position = forward_order.iter().position(|&u| u == unit)?;
    forward_order.get(position + 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_the_neighbours_in_the_orders() {
        // Post-forward order of a root (0) over two nested units: 2 ends inside 1.
        let post_forward = [2, 1, 3, 0];
        assert_eq!(backward_prefetch_target(&post_forward, 0), Some(3));
        assert_eq!(backward_prefetch_target(&post_forward, 1), Some(2));
        assert_eq!(backward_prefetch_target(&post_forward, 2), None);
        assert_eq!(backward_prefetch_target(&post_forward, 7), None, "a unit that did not run");
        let forward = [0, 1, 2, 3];
        assert_eq!(forward_prefetch_target(&forward, 1), Some(2));
        assert_eq!(forward_prefetch_target(&forward, 3), None);
    }
}
