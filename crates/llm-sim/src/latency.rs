//! Latency distributions. A request's latency is a deterministic function of its text
//! (a hash picks the quantile), so a run is repeatable and tests can reason about it.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub enum Latency {
    Fixed(Duration),
    /// Uniform between the bounds.
    Uniform {
        min: Duration,
        max: Duration,
    },
    /// Log-normal with this median and shape σ, plus an optional tail: a share of
    /// requests that take `tail` instead.
    LogNormal {
        median: Duration,
        sigma: f64,
        tail_share: f64,
        tail: Duration,
    },
}

impl Default for Latency {
    fn default() -> Self {
        Latency::Fixed(Duration::ZERO)
    }
}

impl Latency {
    /// `fixed:200`, `uniform:50-400`, `lognormal:200,0.5` or `lognormal:200,0.5,0.01:20000`
    /// (milliseconds; the last form adds a 1% tail of 20 s).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let ms = |s: &str| -> Result<Duration, String> {
            s.trim().parse::<u64>().map(Duration::from_millis).map_err(|e| format!("{s:?}: {e}"))
        };
        let num = |s: &str| -> Result<f64, String> {
            s.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| format!("{s:?} is not a number"))
        };
        let (kind, args) = spec.split_once(':').unwrap_or((spec, ""));
        match kind {
            "fixed" => Ok(Latency::Fixed(ms(args)?)),
            "uniform" => {
                let (a, b) = args.split_once('-').ok_or("uniform:MIN-MAX")?;
                let (min, max) = (ms(a)?, ms(b)?);
                if min > max {
                    return Err("uniform: MIN must not exceed MAX".into());
                }
                Ok(Latency::Uniform { min, max })
            }
            "lognormal" => {
                let parts: Vec<&str> = args.split(',').collect();
                let (median, sigma) = match parts.as_slice() {
                    [m, s] | [m, s, _] => (ms(m)?, num(s)?),
                    _ => return Err("lognormal:MEDIAN,SIGMA[,SHARE:TAIL_MS]".into()),
                };
                let (tail_share, tail) = match parts.get(2) {
                    Some(t) => {
                        let (share, tail) = t.split_once(':').ok_or("tail is SHARE:TAIL_MS")?;
                        let share = num(share)?;
                        if share > 1.0 {
                            return Err("tail share must be within 0..1".into());
                        }
                        (share, ms(tail)?)
                    }
                    None => (0.0, Duration::ZERO),
                };
                Ok(Latency::LogNormal { median, sigma, tail_share, tail })
            }
            _ => Err(format!(
                "unknown latency {spec:?}: fixed:MS, uniform:MIN-MAX or lognormal:MEDIAN,SIGMA[,SHARE:TAIL_MS]"
            )),
        }
    }

    /// The latency for a request with this text.
    pub fn for_text(&self, text: &str) -> Duration {
        match self {
            Latency::Fixed(d) => *d,
            Latency::Uniform { min, max } => *min + (*max - *min).mul_f64(unit(text, 1)),
            Latency::LogNormal { median, sigma, tail_share, tail } => {
                if unit(text, 3) < *tail_share {
                    return *tail;
                }
                // Box-Muller from two independent quantiles.
                let (u1, u2) = (unit(text, 1).max(1e-12), unit(text, 2));
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                median.mul_f64((sigma * z).exp().min(1e4))
            }
        }
    }

    /// The mean of the distribution, for the efficiency bound.
    pub fn mean(&self) -> Duration {
        match self {
            Latency::Fixed(d) => *d,
            Latency::Uniform { min, max } => (*min + *max) / 2,
            Latency::LogNormal { median, sigma, tail_share, tail } => {
                let body = median.mul_f64((sigma * sigma / 2.0).exp());
                body.mul_f64(1.0 - tail_share) + tail.mul_f64(*tail_share)
            }
        }
    }
}

/// A quantile in [0, 1) from the text and a salt (FNV-1a, then SplitMix64).
fn unit(text: &str, salt: u64) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = h.wrapping_add(0x9E37_79B9_7F4A_7C15);
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^= h >> 31;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_and_rejects_nonsense() {
        assert_eq!(Latency::parse("fixed:200").unwrap(), Latency::Fixed(Duration::from_millis(200)));
        assert_eq!(
            Latency::parse("uniform:50-400").unwrap(),
            Latency::Uniform { min: Duration::from_millis(50), max: Duration::from_millis(400) }
        );
        assert_eq!(
            Latency::parse("lognormal:200,0.5,0.01:20000").unwrap(),
            Latency::LogNormal {
                median: Duration::from_millis(200),
                sigma: 0.5,
                tail_share: 0.01,
                tail: Duration::from_secs(20)
            }
        );
        for bad in ["", "fixed", "fixed:-1", "uniform:400-50", "lognormal:200", "lognormal:200,0.5,2:10", "gauss:1"] {
            assert!(Latency::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn deterministic_and_shaped_as_asked() {
        let uniform = Latency::parse("uniform:100-300").unwrap();
        let texts: Vec<String> = (0..4000).map(|i| format!("ticket {i}")).collect();
        assert_eq!(uniform.for_text("a"), uniform.for_text("a"));
        assert!(texts.iter().all(|t| (100..=300).contains(&(uniform.for_text(t).as_millis() as u64))));

        let lognormal = Latency::parse("lognormal:200,0.5,0.01:20000").unwrap();
        let mut ms: Vec<u128> = texts.iter().map(|t| lognormal.for_text(t).as_millis()).collect();
        ms.sort_unstable();
        let median = ms[ms.len() / 2];
        assert!((170..=230).contains(&median), "median {median}");
        let tail = ms.iter().filter(|&&m| m == 20_000).count();
        assert!((20..=60).contains(&tail), "about 1% of 4000 in the tail: {tail}");
        assert!(lognormal.mean() > Duration::from_millis(400), "the tail lifts the mean: {:?}", lognormal.mean());
    }
}
