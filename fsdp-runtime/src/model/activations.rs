//! [`Activations`]: the tensors inside a unit's inputs and outputs, wherever they sit.
//!
//! The runtime must reach every tensor a unit returns (to hook its pre-backward) and
//! every tensor it receives (to order its backward), also inside containers: tuples,
//! `Vec`s, `Option`s, maps, or user structs that implement this trait.

use candle_core::{Result, Tensor};
use std::collections::{BTreeMap, HashMap};

/// A value holding tensors that flow between units.
pub trait Activations: Sized {
    /// Calls `f` on every tensor, in a fixed order.
    fn for_each_tensor(&self, f: &mut dyn FnMut(&Tensor));
    /// Rebuilds the value with every tensor replaced by `f` (same order as
    /// [`Activations::for_each_tensor`]).
    fn map_tensors(self, f: &mut dyn FnMut(Tensor) -> Result<Tensor>) -> Result<Self>;

    /// Every tensor, in [`Activations::for_each_tensor`] order.
    fn tensors(&self) -> Vec<Tensor> {
        let mut tensors = Vec::new();
        self.for_each_tensor(&mut |t| tensors.push(t.clone()));
        tensors
    }

    /// The value with its tensors replaced by `tensors`, in order; there must be as many
    /// as [`Activations::tensors`] returns.
    fn with_tensors(self, tensors: Vec<Tensor>) -> Result<Self> {
        let expected = tensors.len();
        let mut replacements = tensors.into_iter();
        let mut used = 0;
        let rebuilt = self.map_tensors(&mut |_| {
            used += 1;
            replacements
                .next()
                .ok_or_else(|| candle_core::Error::Msg(format!("with_tensors: {expected} tensors for more")))
        })?;
        if used != expected {
            candle_core::bail!("with_tensors: {expected} tensors for a value holding {used}")
        }
        Ok(rebuilt)
    }
}

impl Activations for Tensor {
    fn for_each_tensor(&self, f: &mut dyn FnMut(&Tensor)) {
        f(self)
    }

    fn map_tensors(self, f: &mut dyn FnMut(Tensor) -> Result<Tensor>) -> Result<Self> {
        f(self)
    }
}

impl Activations for () {
    fn for_each_tensor(&self, _f: &mut dyn FnMut(&Tensor)) {}

    fn map_tensors(self, _f: &mut dyn FnMut(Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(())
    }
}

/// Values that carry no tensor (flags, sizes, names) pass through untouched.
macro_rules! no_tensors {
    ($($ty:ty),*) => {$(
        impl Activations for $ty {
            fn for_each_tensor(&self, _f: &mut dyn FnMut(&Tensor)) {}

            fn map_tensors(self, _f: &mut dyn FnMut(Tensor) -> Result<Tensor>) -> Result<Self> {
                Ok(self)
            }
        }
    )*};
}

no_tensors!(bool, usize, u32, i64, f32, f64, String);

macro_rules! tuple_activations {
    ($($name:ident),+) => {
        impl<$($name: Activations),+> Activations for ($($name,)+) {
            #[allow(non_snake_case)]
            fn for_each_tensor(&self, f: &mut dyn FnMut(&Tensor)) {
                let ($($name,)+) = self;
                $($name.for_each_tensor(f);)+
            }

            #[allow(non_snake_case)]
            fn map_tensors(self, f: &mut dyn FnMut(Tensor) -> Result<Tensor>) -> Result<Self> {
                let ($($name,)+) = self;
                Ok(($($name.map_tensors(f)?,)+))
            }
        }
    };
}

tuple_activations!(A);
tuple_activations!(A, B);
tuple_activations!(A, B, C);
tuple_activations!(A, B, C, D);
tuple_activations!(A, B, C, D, E);

impl<A: Activations> Activations for Vec<A> {
    fn for_each_tensor(&self, f: &mut dyn FnMut(&Tensor)) {
        self.iter().for_each(|item| item.for_each_tensor(f))
    }

    fn map_tensors(self, f: &mut dyn FnMut(Tensor) -> Result<Tensor>) -> Result<Self> {
        self.into_iter().map(|item| item.map_tensors(f)).collect()
    }
}

impl<A: Activations> Activations for Option<A> {
    fn for_each_tensor(&self, f: &mut dyn FnMut(&Tensor)) {
        if let Some(item) = self {
            item.for_each_tensor(f)
        }
    }

    fn map_tensors(self, f: &mut dyn FnMut(Tensor) -> Result<Tensor>) -> Result<Self> {
        self.map(|item| item.map_tensors(f)).transpose()
    }
}

/// Maps are walked in key order, so every rank sees the same tensor order.
impl<A: Activations> Activations for BTreeMap<String, A> {
    fn for_each_tensor(&self, f: &mut dyn FnMut(&Tensor)) {
        self.values().for_each(|item| item.for_each_tensor(f))
    }

    fn map_tensors(self, f: &mut dyn FnMut(Tensor) -> Result<Tensor>) -> Result<Self> {
        self.into_iter().map(|(k, v)| Ok((k, v.map_tensors(f)?))).collect()
    }
}

/// Walked in sorted key order (a `HashMap`'s own order differs between ranks).
impl<A: Activations> Activations for HashMap<String, A> {
    fn for_each_tensor(&self, f: &mut dyn FnMut(&Tensor)) {
        let mut keys: Vec<&String> = self.keys().collect();
        keys.sort();
        keys.into_iter().for_each(|k| self[k].for_each_tensor(f))
    }

    fn map_tensors(self, f: &mut dyn FnMut(Tensor) -> Result<Tensor>) -> Result<Self> {
        let sorted: BTreeMap<String, A> = self.into_iter().collect();
        Ok(sorted.map_tensors(f)?.into_iter().collect())
    }
}
