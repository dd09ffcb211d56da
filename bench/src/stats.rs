//! Summaries over interleaved rounds: median and spread, ratios paired by round, and the
//! least-squares line through (transitions, latency) points of the hops mode.
//!
//! A single run on a shared 2-core machine can be off by tens of percent; the spread over
//! rounds is what tells a real difference from noise, so every figure the report leads with
//! (the median) carries its min–max, interquartile range and standard deviation.

use serde::{Deserialize, Serialize};

/// Median and spread of one figure over the rounds that measured it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    /// Rounds that produced a value.
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// First and third quartile (linear interpolation between the closest ranks, the
    /// "type 7" definition of R and numpy), so q3 − q1 is the interquartile range.
    pub q1: f64,
    pub q3: f64,
    /// Sample standard deviation (n − 1); null with fewer than two values.
    pub stdev: Option<f64>,
}

/// The `q` quantile of sorted, non-empty `sorted` (type 7: rank `q·(n−1)`, interpolated).
fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let rank = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// The spread of the finite values in `values`; None if there are none.
pub fn spread(values: &[f64]) -> Option<Spread> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let mean = sorted.iter().sum::<f64>() / n as f64;
    let stdev = (n >= 2).then(|| {
        let ss: f64 = sorted.iter().map(|v| (v - mean).powi(2)).sum();
        (ss / (n - 1) as f64).sqrt()
    });
    Some(Spread {
        n,
        median: quantile_sorted(&sorted, 0.5),
        min: sorted[0],
        max: sorted[n - 1],
        q1: quantile_sorted(&sorted, 0.25),
        q3: quantile_sorted(&sorted, 0.75),
        stdev,
    })
}

/// [`spread`] over the rounds that have a value.
pub fn spread_of(values: &[Option<f64>]) -> Option<Spread> {
    spread(&values.iter().flatten().copied().collect::<Vec<_>>())
}

/// The median of the values present; None if none is.
pub fn median_of(values: &[Option<f64>]) -> Option<f64> {
    spread_of(values).map(|s| s.median)
}

/// `a[i] / b[i]` for each round `i` in which both were measured (and `b[i] > 0`): the ratio
/// of one round's two measurements, taken under the same conditions a few seconds apart.
/// Its spread shows how stable the ratio is, which the ratio of two medians cannot.
pub fn paired_ratios(a: &[Option<f64>], b: &[Option<f64>]) -> Vec<Option<f64>> {
    (0..a.len().max(b.len()))
        .map(
            |i| match (a.get(i).copied().flatten(), b.get(i).copied().flatten()) {
                (Some(x), Some(y)) if y > 0.0 && x.is_finite() && y.is_finite() => Some(x / y),
                _ => None,
            },
        )
        .collect()
}

/// A least-squares line `y = intercept + slope · x`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineFit {
    pub slope: f64,
    pub intercept: f64,
    /// Coefficient of determination; null when every y is the same (nothing to explain).
    pub r2: Option<f64>,
    /// Points fitted.
    pub n: usize,
}

/// Ordinary least squares through `points`; None with fewer than two distinct x.
pub fn fit_line(points: &[(f64, f64)]) -> Option<LineFit> {
    let points: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let n = points.len();
    if n < 2 {
        return None;
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n as f64;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n as f64;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    if sxx == 0.0 {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let slope = sxy / sxx;
    let intercept = mean_y - slope * mean_x;
    let ss_tot: f64 = points.iter().map(|p| (p.1 - mean_y).powi(2)).sum();
    let ss_res: f64 = points
        .iter()
        .map(|p| (p.1 - (intercept + slope * p.0)).powi(2))
        .sum();
    Some(LineFit {
        slope,
        intercept,
        r2: (ss_tot > 0.0).then(|| 1.0 - ss_res / ss_tot),
        n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn median_quartiles_and_stdev() {
        let s = spread(&[5.0, 1.0, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!((s.n, s.median, s.min, s.max), (5, 3.0, 1.0, 5.0));
        assert_eq!((s.q1, s.q3), (2.0, 4.0));
        // Sample stdev of 1..5: sqrt(10 / 4).
        assert!(close(s.stdev.unwrap(), 2.5f64.sqrt()));
        // Even count: the median interpolates, as do the quartiles.
        let s = spread(&[10.0, 40.0, 20.0, 30.0]).unwrap();
        assert_eq!(s.median, 25.0);
        assert_eq!((s.q1, s.q3), (17.5, 32.5));
        // One value: no stdev, everything else is that value.
        let s = spread(&[7.0]).unwrap();
        assert_eq!(
            (s.median, s.min, s.max, s.q1, s.q3),
            (7.0, 7.0, 7.0, 7.0, 7.0)
        );
        assert_eq!(s.stdev, None);
        // Non-finite values and missing rounds are left out, not averaged in.
        assert_eq!(spread(&[]), None);
        assert_eq!(spread(&[f64::NAN]), None);
        assert_eq!(spread(&[1.0, f64::INFINITY, 3.0]).unwrap().median, 2.0);
        assert_eq!(median_of(&[None, Some(4.0), Some(8.0), None]), Some(6.0));
        assert_eq!(median_of(&[None]), None);
        assert_eq!(spread_of(&[Some(1.0), None, Some(9.0)]).unwrap().n, 2);
    }

    #[test]
    fn ratios_pair_rounds_and_skip_rounds_missing_either_side() {
        let spindle = [Some(50.0), Some(60.0), None, Some(40.0)];
        let knative = [Some(10.0), Some(20.0), Some(10.0), Some(0.0)];
        let r = paired_ratios(&spindle, &knative);
        assert_eq!(r, vec![Some(5.0), Some(3.0), None, None]);
        // Shorter side: the missing rounds are missing, not zero.
        assert_eq!(
            paired_ratios(&[Some(2.0)], &[Some(1.0), Some(1.0)]),
            vec![Some(2.0), None]
        );
        // Paired ratios are not the ratio of medians: here the medians' ratio is 55/15 = 3.67,
        // while the rounds said 5 and 3.
        let s = spread_of(&r).unwrap();
        assert_eq!((s.median, s.min, s.max), (4.0, 3.0, 5.0));
    }

    #[test]
    fn fits_a_line_by_least_squares() {
        // p50 = 30 + 13·transitions exactly.
        let fit = fit_line(&[(2.0, 56.0), (4.0, 82.0), (7.0, 121.0)]).unwrap();
        assert!(
            close(fit.slope, 13.0) && close(fit.intercept, 30.0),
            "{fit:?}"
        );
        assert!(close(fit.r2.unwrap(), 1.0));
        assert_eq!(fit.n, 3);
        // Noisy: slope = Sxy / Sxx. x = 1,2,3 (mean 2), y = 1,3,2 (mean 2): Sxy = 1, Sxx = 2.
        let fit = fit_line(&[(1.0, 1.0), (2.0, 3.0), (3.0, 2.0)]).unwrap();
        assert!(
            close(fit.slope, 0.5) && close(fit.intercept, 1.0),
            "{fit:?}"
        );
        // SSres = 0.25 + 1 + 0.25 = 1.5 of SStot = 2.
        assert!(close(fit.r2.unwrap(), 0.25));
        // Flat: slope 0, nothing to explain.
        let fit = fit_line(&[(1.0, 5.0), (2.0, 5.0)]).unwrap();
        assert_eq!((fit.slope, fit.r2), (0.0, None));
        // Under-determined.
        assert_eq!(fit_line(&[(1.0, 5.0)]), None);
        assert_eq!(fit_line(&[(1.0, 5.0), (1.0, 6.0)]), None);
        assert_eq!(fit_line(&[(1.0, 5.0), (f64::NAN, 6.0)]), None);
    }
}
