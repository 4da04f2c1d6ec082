//! What a forward pass reports: each Linear input group's activations, as it computes them.

use super::names::InputGroup;
use crate::hessian::HessianAccumulator;
use crate::{ForgeError, Result};
use ndarray::{concatenate, Array2, ArrayView2, Axis};
use std::collections::BTreeMap;

/// Receives the inputs of each Linear group while a layer runs (`x`: `(tokens, in_features)`,
/// only real tokens: no padding exists anywhere in the forward). Experts report only the
/// tokens routed to them, and only when there is at least one.
pub trait ActivationSink {
    /// One batch of inputs of `group`.
    fn record(&mut self, group: InputGroup, x: ArrayView2<'_, f32>) -> Result<()>;
}

/// Accumulates one Hessian `2/n·XᵀX` per input group (the CPU reference accumulator).
#[derive(Clone, Debug, Default)]
pub struct HessianSink {
    hessians: BTreeMap<InputGroup, HessianAccumulator>,
}

impl HessianSink {
    /// No groups yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The Hessian of `group`, if it saw any token.
    pub fn get(&self, group: InputGroup) -> Option<&HessianAccumulator> {
        self.hessians.get(&group)
    }

    /// Tokens `group` saw (0 when none: an expert no token was routed to).
    pub fn tokens(&self, group: InputGroup) -> u64 {
        self.hessians.get(&group).map_or(0, HessianAccumulator::tokens)
    }

    /// Every group that saw tokens, in order.
    pub fn groups(&self) -> impl Iterator<Item = (&InputGroup, &HessianAccumulator)> {
        self.hessians.iter()
    }

    /// Puts `acc` in place of `group`'s accumulator (the expert coverage policy's Hessians).
    pub fn replace(&mut self, group: InputGroup, acc: HessianAccumulator) {
        self.hessians.insert(group, acc);
    }

    /// Removes `group`'s accumulator.
    pub fn remove(&mut self, group: InputGroup) -> Option<HessianAccumulator> {
        self.hessians.remove(&group)
    }

    /// Takes the accumulators out.
    pub fn into_map(self) -> BTreeMap<InputGroup, HessianAccumulator> {
        self.hessians
    }
}

impl ActivationSink for HessianSink {
    fn record(&mut self, group: InputGroup, x: ArrayView2<'_, f32>) -> Result<()> {
        let acc = match self.hessians.entry(group) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => e.insert(HessianAccumulator::new(x.ncols())?),
        };
        acc.update(x)
    }
}

/// Keeps every reported activation, rows appended in the order they arrive (for tests and
/// for comparing against another implementation's hooks).
#[derive(Clone, Debug, Default)]
pub struct RecordingSink {
    inputs: BTreeMap<InputGroup, Vec<Array2<f32>>>,
}

impl RecordingSink {
    /// Nothing recorded yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// All rows reported for `group`, concatenated (`None` when nothing was).
    pub fn rows(&self, group: InputGroup) -> Result<Option<Array2<f32>>> {
        let Some(parts) = self.inputs.get(&group) else { return Ok(None) };
        let views: Vec<ArrayView2<'_, f32>> = parts.iter().map(|a| a.view()).collect();
        concatenate(Axis(0), &views).map(Some).map_err(|e| ForgeError::Shape(format!("{group:?}: {e}")))
    }

    /// Every group that reported rows.
    pub fn groups(&self) -> impl Iterator<Item = &InputGroup> {
        self.inputs.keys()
    }
}

impl ActivationSink for RecordingSink {
    fn record(&mut self, group: InputGroup, x: ArrayView2<'_, f32>) -> Result<()> {
        self.inputs.entry(group).or_default().push(x.to_owned());
        Ok(())
    }
}

/// Reports to several sinks in turn.
pub struct Tee<'a>(pub Vec<&'a mut dyn ActivationSink>);

impl ActivationSink for Tee<'_> {
    fn record(&mut self, group: InputGroup, x: ArrayView2<'_, f32>) -> Result<()> {
        for s in self.0.iter_mut() {
            s.record(group, x)?;
        }
        Ok(())
    }
}
