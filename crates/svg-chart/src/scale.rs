//! Values to fractions of a plot (0 at one edge, 1 at the other, clamped), and the ticks of an
//! axis: linear for counts and shares, logarithmic for times that span decades.

/// `lo` at 0, `hi` at 1, evenly between.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Linear {
    pub lo: f64,
    pub hi: f64,
}

impl Linear {
    /// Where `v` sits, clamped to 0..=1. A value that is not finite, or a scale with no width,
    /// sits at `lo`: a chart draws it at the edge rather than lose the picture to a NaN.
    pub fn fraction(&self, v: f64) -> f64 {
        if !v.is_finite() {
            return 0.0;
        }
        let t = (v - self.lo) / (self.hi - self.lo);
        if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) }
    }

    /// `parts + 1` ticks from `lo` to `hi`, evenly apart.
    pub fn even_ticks(&self, parts: u32) -> impl Iterator<Item = f64> + use<> {
        let (lo, span, parts) = (self.lo, self.hi - self.lo, parts.max(1));
        (0..=parts).map(move |i| lo + span * f64::from(i) / f64::from(parts))
    }

    /// Ticks from `lo` every `step` up to `hi` (and a hair past it, so that `hi` itself is not
    /// lost to rounding). Empty for a step that is not positive and finite.
    pub fn stepped_ticks(&self, step: f64) -> Vec<f64> {
        let mut ticks = Vec::new();
        if !(step > 0.0 && step.is_finite() && self.lo.is_finite() && self.hi.is_finite()) {
            return ticks;
        }
        let mut t = self.lo;
        while t <= self.hi + 1e-9 {
            ticks.push(t);
            t += step;
        }
        ticks
    }
}

/// Decades from `floor` at 0 to `ceiling` at 1: a given ratio is the same height anywhere, so a
/// chart of times from a millisecond to half a minute shows a fourfold drift at either end.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Log {
    floor: f64,
    lo: f64,
    hi: f64,
}

impl Log {
    /// `floor` and `ceiling` are positive, `ceiling` above `floor`.
    pub fn new(floor: f64, ceiling: f64) -> Self {
        Self { floor, lo: floor.log10(), hi: ceiling.log10() }
    }

    pub fn ceiling(&self) -> f64 {
        10f64.powf(self.hi)
    }

    /// Where `v` sits, clamped to 0..=1; anything below the floor, or not finite, on the floor.
    pub fn fraction(&self, v: f64) -> f64 {
        let v = if v.is_finite() { v.max(self.floor) } else { self.floor };
        ((v.log10() - self.lo) / (self.hi - self.lo)).clamp(0.0, 1.0)
    }

    /// The floor and every tenfold above it up to the ceiling.
    pub fn decades(&self) -> Vec<f64> {
        let mut decades = Vec::new();
        let (top, mut decade) = (self.ceiling() * 1.0001, self.floor);
        // A floor that is not positive, or a ceiling at infinity, would never end the list.
        while decade <= top && decade > 0.0 && decade.is_finite() {
            decades.push(decade);
            decade *= 10.0;
        }
        decades
    }
}

/// The smallest 1, 2 or 5 × 10^k at or above `v`: axis tops people can read.
pub fn nice_ceiling(v: f64) -> f64 {
    if !v.is_finite() || v <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|c| *c >= v).unwrap_or(10.0 * magnitude)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn axis_tops_are_readable() {
        assert_eq!(
            [nice_ceiling(0.7), nice_ceiling(3.1), nice_ceiling(30.0), nice_ceiling(0.0)],
            [1.0, 5.0, 50.0, 1.0]
        );
        assert_eq!(nice_ceiling(f64::NAN), 1.0);
    }

    #[test]
    fn linear_ticks_cover_the_scale() {
        let s = Linear { lo: 0.0, hi: 8.0 };
        assert_eq!(s.even_ticks(4).collect::<Vec<_>>(), [0.0, 2.0, 4.0, 6.0, 8.0]);
        assert_eq!(Linear { lo: 0.0, hi: 1.0 }.even_ticks(2).collect::<Vec<_>>(), [0.0, 0.5, 1.0]);
        assert_eq!(Linear { lo: 0.0, hi: 0.3 }.stepped_ticks(0.1).len(), 4, "0.3 is kept despite rounding");
        assert!(s.stepped_ticks(0.0).is_empty() && s.stepped_ticks(f64::NAN).is_empty());
    }

    #[test]
    fn the_log_scale_keeps_a_ratio_the_same_height_and_clamps_outside_values() {
        let s = Log::new(0.001, 30.0);
        let (a, b) = (s.fraction(0.008) - s.fraction(0.002), s.fraction(2.0) - s.fraction(0.5));
        assert!((a - b).abs() < 1e-9, "4x is the same height at 2 ms and at 500 ms: {a} vs {b}");
        assert_eq!((s.fraction(0.0), s.fraction(f64::NAN), s.fraction(1000.0)), (0.0, 0.0, 1.0));
        let decades = s.decades();
        assert_eq!(decades.len(), 5, "1 ms to 10 s under a 30 s ceiling: {decades:?}");
        assert!((decades[4] - 10.0).abs() < 1e-9, "{decades:?}");
        assert_eq!(Log::new(0.001, 80.0).ceiling().round(), 80.0);
    }

    proptest! {
        /// Whatever the value and the scale, the fraction is a number in 0..=1: a chart never
        /// writes NaN, nor a point outside its plot.
        #[test]
        fn every_value_lands_on_the_plot(v in any::<f64>(), lo in -1e6f64..1e6, width in prop_oneof![Just(0.0), 1e-9f64..1e6]) {
            let t = Linear { lo, hi: lo + width }.fraction(v);
            prop_assert!((0.0..=1.0).contains(&t), "{t}");
            let t = Log::new(0.001, 30.0).fraction(v);
            prop_assert!((0.0..=1.0).contains(&t), "{t}");
        }
    }
}
