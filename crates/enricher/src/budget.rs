//! Budgets (`[[llm.budgets]]`, e.g. USD per hour and per day): before each call its
//! cost is estimated from the input and `llm.max_output_tokens` and reserved in every
//! window's row in PostgreSQL, atomically against the limit, so concurrent calls on any
//! replica cannot overspend; after the call the reservation is settled with the real
//! cost. A call that does not fit waits for the next window (nothing is dead-lettered;
//! the consumer fills and pauses meanwhile, and `/readyz` says why).

use enrich_common::config::BudgetWindow;
use sqlx::PgPool;
use std::time::Duration;

pub struct Budgets {
    pub pool: PgPool,
    pub pipeline: String,
    pub windows: Vec<BudgetWindow>,
}

/// What a call reserved, in each window (settled after the call).
#[derive(Debug)]
pub struct Reservation {
    estimate: f64,
    starts: Vec<(i64, i64)>,
}

impl Budgets {
    fn window_start(window_secs: u64, now_secs: i64) -> i64 {
        let w = window_secs.max(1) as i64;
        now_secs.div_euclid(w) * w
    }

    /// Reserves `estimate` USD in every window, or says how long until the window that
    /// refused it rolls over.
    pub async fn reserve(&self, estimate: f64) -> anyhow::Result<Result<Reservation, Duration>> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
        let mut tx = self.pool.begin().await?;
        let mut starts = Vec::new();
        for w in &self.windows {
            let start = Self::window_start(w.window_secs, now as i64);
            let reserved: Option<(f64,)> = sqlx::query_as(
                "INSERT INTO budget_windows (pipeline, window_secs, window_start, limit_usd, reserved_usd)
                 VALUES ($1, $2, to_timestamp($3), $4, $5)
                 ON CONFLICT (pipeline, window_secs, window_start) DO UPDATE
                   SET reserved_usd = budget_windows.reserved_usd + $5, limit_usd = $4
                   WHERE budget_windows.reserved_usd + budget_windows.spent_usd + $5 <= $4
                 RETURNING reserved_usd",
            )
            .bind(&self.pipeline)
            .bind(w.window_secs as i64)
            .bind(start as f64)
            .bind(w.usd)
            .bind(estimate)
            .fetch_optional(&mut *tx)
            .await?;
            // The first call of a window may exceed nothing but the limit itself.
            let fits = reserved.is_some_and(|(r,)| r <= w.usd + 1e-12);
            if !fits {
                tx.rollback().await?;
                let next = (start + w.window_secs as i64) as f64 - now;
                return Ok(Err(Duration::from_secs_f64(next.max(0.05))));
            }
            starts.push((w.window_secs as i64, start));
        }
        tx.commit().await?;
        Ok(Ok(Reservation { estimate, starts }))
    }

    /// Turns the reservation into the real cost (0 for a call that failed before an
    /// answer), in every window at once: one statement, so a retry after a failure never
    /// settles a window twice.
    pub async fn settle(&self, r: &Reservation, actual: f64) -> anyhow::Result<()> {
        let (secs, starts): (Vec<i64>, Vec<f64>) = r.starts.iter().map(|(w, s)| (*w, *s as f64)).unzip();
        sqlx::query(
            "UPDATE budget_windows b SET reserved_usd = GREATEST(b.reserved_usd - $4, 0), spent_usd = b.spent_usd + $5,
                    calls = b.calls + CASE WHEN $5 > 0 THEN 1 ELSE 0 END
             FROM UNNEST($2::bigint[], $3::float8[]) AS w(secs, start)
             WHERE b.pipeline = $1 AND b.window_secs = w.secs AND b.window_start = to_timestamp(w.start)",
        )
        .bind(&self.pipeline)
        .bind(&secs)
        .bind(&starts)
        .bind(r.estimate)
        .bind(actual)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_aligned_to_their_length() {
        assert_eq!(Budgets::window_start(3600, 7_250), 7_200);
        assert_eq!(Budgets::window_start(86_400, 86_399), 0);
        assert_eq!(Budgets::window_start(10, 10), 10);
    }
}
