//! Micro-batching: many tasks each ask for one database operation; one writer runs
//! whatever has queued up as a single statement. Under load a statement carries tens
//! or hundreds of records, so the database sees a few commits per second instead of
//! two per record; when idle, a request runs alone at once (no linger).

use std::sync::Arc;
use tokio::sync::{Mutex, mpsc, oneshot};

/// An answer, or the batch's failure and whether it was transient.
type Reply<Resp> = oneshot::Sender<Result<Resp, (String, bool)>>;

pub struct MicroBatcher<Req, Resp> {
    tx: mpsc::UnboundedSender<(Req, Reply<Resp>)>,
}

impl<Req: Send + 'static, Resp: Send + 'static> MicroBatcher<Req, Resp> {
    /// Starts `writers` writers. Each takes what has queued (at most `max_batch`) and
    /// runs it; several writers let the next batch start while one is still committing.
    /// `run` must answer each request, in order.
    pub fn spawn<F, Fut>(writers: usize, max_batch: usize, run: F) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = anyhow::Result<Vec<Resp>>> + Send,
    {
        let (tx, rx) = mpsc::unbounded_channel::<(Req, Reply<Resp>)>();
        let rx = Arc::new(Mutex::new(rx));
        let run = Arc::new(run);
        for _ in 0..writers.max(1) {
            let (rx, run) = (rx.clone(), run.clone());
            tokio::spawn(async move {
                loop {
                    let items = {
                        let mut rx = rx.lock().await;
                        let Some(first) = rx.recv().await else { return };
                        let mut items = vec![first];
                        while items.len() < max_batch {
                            match rx.try_recv() {
                                Ok(item) => items.push(item),
                                Err(_) => break,
                            }
                        }
                        items
                    };
                    Self::answer(items, run.as_ref()).await;
                }
            });
        }
        Self { tx }
    }

    async fn answer<F, Fut>(items: Vec<(Req, Reply<Resp>)>, run: &F)
    where
        F: Fn(Vec<Req>) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Vec<Resp>>>,
    {
        {
            {
                let (requests, replies): (Vec<Req>, Vec<Reply<Resp>>) = items.into_iter().unzip();
                let expected = replies.len();
                match run(requests).await {
                    Ok(answers) if answers.len() == expected => {
                        for (reply, answer) in replies.into_iter().zip(answers) {
                            let _ = reply.send(Ok(answer));
                        }
                    }
                    Ok(answers) => {
                        let msg = format!("batch answered {} of {expected} requests", answers.len());
                        for reply in replies {
                            let _ = reply.send(Err((msg.clone(), false)));
                        }
                    }
                    Err(e) => {
                        let msg = format!("{e:#}");
                        let transient = enrich_common::db::is_transient(&e);
                        for reply in replies {
                            let _ = reply.send(Err((msg.clone(), transient)));
                        }
                    }
                }
            }
        }
    }

    /// Queues one request and waits for its answer.
    pub async fn call(&self, request: Req) -> anyhow::Result<Resp> {
        let (reply, answer) = oneshot::channel();
        self.tx.send((request, reply)).map_err(|_| anyhow::anyhow!("the batch writer has stopped"))?;
        answer.await.map_err(|_| anyhow::anyhow!("the batch writer dropped a request"))?.map_err(|(msg, transient)| {
            if transient { anyhow::Error::new(enrich_common::db::Transient(msg)) } else { anyhow::Error::msg(msg) }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_requests_share_batches_and_get_their_own_answers() {
        let batches = Arc::new(AtomicUsize::new(0));
        let seen = batches.clone();
        let doubler = Arc::new(MicroBatcher::spawn(2, 64, move |xs: Vec<u32>| {
            let seen = seen.clone();
            async move {
                seen.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
                Ok(xs.into_iter().map(|x| x * 2).collect())
            }
        }));
        let tasks: Vec<_> = (0..200u32)
            .map(|i| {
                let d = doubler.clone();
                tokio::spawn(async move { d.call(i).await.unwrap() })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), i as u32 * 2);
        }
        assert!(batches.load(Ordering::SeqCst) < 200, "requests were batched");
    }

    #[tokio::test]
    async fn a_failed_batch_fails_each_request_with_the_cause() {
        let b = MicroBatcher::spawn(1, 8, |_: Vec<u32>| async { Err::<Vec<u32>, _>(anyhow::anyhow!("db down")) });
        assert!(b.call(1).await.unwrap_err().to_string().contains("db down"));
    }
}
