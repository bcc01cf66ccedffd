//! A consumer that reads the run's topic while the run goes on, so that duplicates can be
//! attributed to the fault that caused them: at each fault the harness sets a marker (after the
//! stream went quiet), and a duplicate first read between marker k and marker k+1 is charged
//! to fault k. The final verdict comes from a separate, fresh read of the whole topic.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use uuid::Uuid;

/// The live reader.
pub struct LiveReader {
    ids: Arc<Mutex<(Vec<Uuid>, Instant)>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    markers: Vec<usize>,
}

impl LiveReader {
    /// Starts reading `partitions` partitions of `topic` from the beginning.
    pub fn start(bootstrap: &str, topic: &str, partitions: i32) -> Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", outbox_tests::unique("chaos-live"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("topic.metadata.refresh.interval.ms", "1000")
            // Short fetch long-polls, so that "quiet" at a fault marker means nothing is pending.
            .set("fetch.wait.max.ms", "20")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let ids = Arc::new(Mutex::new((Vec::new(), Instant::now())));
        let stop = Arc::new(AtomicBool::new(false));
        let (ids2, stop2) = (ids.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
                    let id = m.headers().and_then(|h| {
                        h.iter()
                            .find(|h| h.key == "id")
                            .and_then(|h| h.value)
                            .and_then(|v| Uuid::try_parse_ascii(v).ok())
                    });
                    let mut g = ids2.lock().unwrap();
                    g.0.push(id.unwrap_or_else(Uuid::nil));
                    g.1 = Instant::now();
                }
            }
        });
        Ok(Self {
            ids,
            stop,
            thread: Some(thread),
            markers: Vec::new(),
        })
    }

    /// Whether a record with this id was read.
    pub fn seen(&self, id: Uuid) -> bool {
        self.ids.lock().unwrap().0.contains(&id)
    }

    /// How many of `ids` were not read yet.
    pub fn missing(&self, ids: &HashSet<Uuid>) -> usize {
        let g = self.ids.lock().unwrap();
        let read: HashSet<&Uuid> = g.0.iter().collect();
        ids.iter().filter(|id| !read.contains(id)).count()
    }

    /// Records read so far.
    pub fn count(&self) -> usize {
        self.ids.lock().unwrap().0.len()
    }

    /// Waits until nothing new arrived for `quiet` (at most `max`), then sets a fault marker.
    pub async fn mark_after_quiet(&mut self, quiet: Duration, max: Duration) {
        let started = Instant::now();
        while started.elapsed() < max {
            if self.ids.lock().unwrap().1.elapsed() >= quiet {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let n = self.count();
        self.markers.push(n);
    }

    /// Sets a fault marker now.
    pub fn mark(&mut self) {
        let n = self.count();
        self.markers.push(n);
    }

    /// Stops reading; returns, per fault, the duplicates first read after its marker and before
    /// the next one.
    pub fn finish(mut self) -> Vec<usize> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let ids = self.ids.lock().unwrap().0.clone();
        let mut seen = HashSet::new();
        let mut per_fault = vec![0usize; self.markers.len()];
        for (i, id) in ids.iter().enumerate() {
            if !seen.insert(*id) {
                // The last marker at or before this record.
                if let Some(k) = self.markers.iter().rposition(|&m| m <= i) {
                    per_fault[k] += 1;
                }
            }
        }
        per_fault
    }
}

impl Drop for LiveReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
