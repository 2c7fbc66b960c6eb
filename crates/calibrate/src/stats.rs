//! The few statistics calibrate needs, pure: percentiles and Spearman's rank correlation. Small
//! enough to write here and test on known data; a statistics crate would bring far more than
//! these two functions.

/// The `q`-quantile (0 ≤ q ≤ 1) of `values`, interpolating linearly between the two nearest
/// ranks (the usual "type 7" definition, as numpy's default). Non-finite values are ignored;
/// None when nothing is left.
pub fn percentile(values: &[f64], q: f64) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() || !(0.0..=1.0).contains(&q) {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let rank = q * (sorted.len() - 1) as f64;
    let below = rank.floor() as usize;
    let above = rank.ceil() as usize;
    let (lo, hi) = (sorted.get(below)?, sorted.get(above)?);
    Some(lo + (hi - lo) * (rank - below as f64))
}

/// Ranks 1..=n, ties sharing the average of the ranks they span.
fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|a, b| values[*a].total_cmp(&values[*b]));
    let mut ranks = vec![0.0; values.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        // Positions i..=j (0-based) hold equal values: each gets the mean rank (i+1 + j+1) / 2.
        let shared = (i + j) as f64 / 2.0 + 1.0;
        for k in &order[i..=j] {
            ranks[*k] = shared;
        }
        i = j + 1;
    }
    ranks
}

/// Fewest pairs a rank correlation is reported on: with two, any two distinct pairs give ±1.
pub const MIN_PAIRS: usize = 3;

/// Spearman's rank correlation of the pairs, -1..=1: the Pearson correlation of their ranks
/// (ties averaged). None with fewer than `MIN_PAIRS` finite pairs, or when either side never
/// changes (a constant says nothing about the other side).
pub fn spearman(pairs: &[(f64, f64)]) -> Option<f64> {
    let pairs: Vec<(f64, f64)> = pairs.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
    if pairs.len() < MIN_PAIRS {
        return None;
    }
    let xs = ranks(&pairs.iter().map(|p| p.0).collect::<Vec<_>>());
    let ys = ranks(&pairs.iter().map(|p| p.1).collect::<Vec<_>>());
    let n = xs.len() as f64;
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (x, y) in xs.iter().zip(&ys) {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx) * (x - mx);
        syy += (y - my) * (y - my);
    }
    if sxx == 0.0 || syy == 0.0 {
        return None;
    }
    Some((sxy / (sxx * syy).sqrt()).clamp(-1.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn percentiles_of_known_data() {
        let v = [15.0, 20.0, 35.0, 40.0, 50.0];
        assert!(close(percentile(&v, 0.0), 15.0));
        assert!(close(percentile(&v, 0.5), 35.0));
        assert!(close(percentile(&v, 1.0), 50.0));
        assert!(close(percentile(&v, 0.4), 29.0), "between 20 and 35: {:?}", percentile(&v, 0.4));
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!(close(percentile(&hundred, 0.99), 99.01));
        assert!(close(percentile(&[7.0], 0.99), 7.0));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[f64::NAN, f64::INFINITY], 0.5), None);
        assert!(close(percentile(&[f64::NAN, 3.0, 1.0], 0.5), 2.0), "NaN is ignored");
        assert_eq!(percentile(&[1.0], 1.5), None);
    }

    #[test]
    fn spearman_of_known_data() {
        // Monotone but not linear: ranks agree perfectly.
        let rising: Vec<(f64, f64)> = (1..=6).map(|i| (f64::from(i), f64::from(i).powi(3))).collect();
        assert!(close(spearman(&rising), 1.0));
        let falling: Vec<(f64, f64)> = (1..=6).map(|i| (f64::from(i), -f64::from(i).exp())).collect();
        assert!(close(spearman(&falling), -1.0));
        // The textbook example: d² sum 194 over n = 10, rho = 1 - 6·194/(10·99) = -0.175757...
        let iq = [106.0, 100.0, 86.0, 101.0, 99.0, 103.0, 97.0, 113.0, 112.0, 110.0];
        let tv = [7.0, 27.0, 2.0, 50.0, 28.0, 29.0, 20.0, 12.0, 6.0, 17.0];
        let pairs: Vec<(f64, f64)> = iq.into_iter().zip(tv).collect();
        assert!(close(spearman(&pairs), -29.0 / 165.0), "{:?}", spearman(&pairs));
        // Ties take average ranks: x ranks [1.5, 1.5, 3, 4] against y ranks [1, 2, 3, 4].
        let tied = [(1.0, 1.0), (1.0, 2.0), (2.0, 3.0), (3.0, 4.0)];
        let expected = 4.5 / (4.5_f64 * 5.0).sqrt();
        assert!(close(spearman(&tied), expected), "{:?}", spearman(&tied));
    }

    #[test]
    fn spearman_says_nothing_about_constants_or_too_few_pairs() {
        assert_eq!(spearman(&[(1.0, 1.0), (2.0, 2.0)]), None);
        assert_eq!(spearman(&[(5.0, 1.0), (5.0, 2.0), (5.0, 3.0)]), None, "x never changes");
        assert_eq!(spearman(&[(1.0, 1.0), (f64::NAN, 2.0), (3.0, f64::INFINITY), (4.0, 2.0)]), None);
    }

    proptest! {
        #[test]
        fn spearman_is_bounded_symmetric_and_unchanged_by_order_keeping_maps(
            pairs in proptest::collection::vec((-1e6f64..1e6, -1e6f64..1e6), 0..40)
        ) {
            let rho = spearman(&pairs);
            if let Some(r) = rho {
                prop_assert!((-1.0..=1.0).contains(&r));
            }
            let swapped: Vec<(f64, f64)> = pairs.iter().map(|(x, y)| (*y, *x)).collect();
            prop_assert_eq!(rho.map(|r| (r * 1e9).round()), spearman(&swapped).map(|r| (r * 1e9).round()));
            // Doubling x (exact in floating point) keeps its ranks, hence rho; negating it
            // reverses them, hence -rho.
            let doubled: Vec<(f64, f64)> = pairs.iter().map(|(x, y)| (x * 2.0, *y)).collect();
            prop_assert_eq!(rho.map(|r| (r * 1e9).round()), spearman(&doubled).map(|r| (r * 1e9).round()));
            let negated: Vec<(f64, f64)> = pairs.iter().map(|(x, y)| (-x, *y)).collect();
            prop_assert_eq!(rho.map(|r| (-r * 1e9).round()), spearman(&negated).map(|r| (r * 1e9).round()));
        }

        #[test]
        fn percentiles_are_ordered_and_within_the_data(
            values in proptest::collection::vec(-1e9f64..1e9, 1..60), a in 0.0f64..=1.0, b in 0.0f64..=1.0
        ) {
            let (lo, hi) = (a.min(b), a.max(b));
            let (p_lo, p_hi) = (percentile(&values, lo), percentile(&values, hi));
            prop_assert!(p_lo <= p_hi);
            let min = values.iter().copied().fold(f64::INFINITY, f64::min);
            let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            prop_assert!(p_lo.is_some_and(|p| p >= min) && p_hi.is_some_and(|p| p <= max));
        }
    }
}
