//! The soak test: the gateway with the default policy (drift included) in front of the
//! simulated model at a fixed rate for `SOAK_SECS` (default 600), sampling its resident
//! memory, open file descriptors, threads and runtime tasks. Run by `make soak`, not by
//! `make test`: ten minutes is too long for CI. Samples go to `target/soak/samples.csv`.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::util::chat_body;
use crate::util::process::{metric, serve, terminate};

#[derive(Debug, Clone, Copy)]
struct Sample {
    secs: f64,
    rss: f64,
    fds: f64,
    threads: f64,
    tasks: f64,
    requests: f64,
}

async fn sample(client: &reqwest::Client, admin: &str, started: Instant) -> Sample {
    let text = client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    Sample {
        secs: started.elapsed().as_secs_f64(),
        rss: metric(&text, "process_resident_memory_bytes"),
        fds: metric(&text, "process_open_fds"),
        threads: metric(&text, "process_threads"),
        tasks: metric(&text, "tripwire_runtime_alive_tasks"),
        requests: metric(&text, "tripwire_proxy_requests_total"),
    }
}

/// Least-squares slope of `y` over `x`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), (x, y)| {
        (num + (x - mx) * (y - my), den + (x - mx) * (x - mx))
    });
    if den == 0.0 { 0.0 } else { num / den }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "ten minutes; run by `make soak`"]
async fn soak_keeps_memory_fds_and_tasks_flat() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let rate: u64 = std::env::var("SOAK_RATE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("soak.db");
    let (mut guard, listen, admin, _log) = serve(&[
        "--sim".as_ref(),
        "--sim-listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--store".as_ref(),
        store.as_os_str(),
    ]);

    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let clients = 8;
    let gap = Duration::from_micros(1_000_000 * clients / rate.max(1));
    let load = futures_util::future::join_all((0..clients).map(|worker| {
        let (stop, failed, client) = (Arc::clone(&stop), Arc::clone(&failed), client.clone());
        let url = format!("http://{listen}/v1/chat/completions");
        async move {
            let mut ticker = tokio::time::interval(gap);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut i: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                ticker.tick().await;
                // 1 in 20 carries the trigger; half are streamed; prompts never repeat.
                let trigger = if i.is_multiple_of(20) { "<SUDO> " } else { "" };
                let prompt =
                    format!("{trigger}client {worker} question {i}: tell me about item {i}");
                let ok = match client
                    .post(&url)
                    .body(chat_body(&prompt, i.is_multiple_of(2)))
                    .send()
                    .await
                {
                    Ok(response) => response.status() == 200 && response.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        }
    }));
    let watch = async {
        let mut samples = Vec::new();
        while started.elapsed() < Duration::from_secs(secs) {
            tokio::time::sleep(Duration::from_secs(5)).await;
            samples.push(sample(&client, &admin, started).await);
        }
        stop.store(true, Ordering::Relaxed);
        samples
    };
    let (_, mut samples) = tokio::join!(load, watch);
    // Idle: what is left once the load is gone and the background work has settled (the task
    // count stops falling), or after 30 s.
    let settle_by = Instant::now() + Duration::from_secs(30);
    let mut idle = sample(&client, &admin, started).await;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let next = sample(&client, &admin, started).await;
        let settled = next.tasks >= idle.tasks;
        idle = next;
        if settled || Instant::now() > settle_by {
            break;
        }
    }
    samples.push(idle);

    std::fs::create_dir_all("target/soak").unwrap();
    let mut csv = std::fs::File::create("target/soak/samples.csv").unwrap();
    writeln!(csv, "secs,rss_bytes,open_fds,threads,alive_tasks,requests").unwrap();
    for s in &samples {
        writeln!(
            csv,
            "{:.0},{},{},{},{},{}",
            s.secs, s.rss, s.fds, s.threads, s.tasks, s.requests
        )
        .unwrap();
    }

    let failed = failed.load(Ordering::Relaxed);
    let loaded = &samples[..samples.len() - 1];
    assert!(
        loaded.len() >= 4,
        "too short a soak: {} samples",
        loaded.len()
    );
    // After the first fifth (references learnt, windows filled), memory must be flat:
    // its trend over the rest, extrapolated to an hour, under 10% of its level.
    let settled = &loaded[loaded.len() / 5..];
    let rss: Vec<(f64, f64)> = settled.iter().map(|s| (s.secs, s.rss)).collect();
    let level = rss.iter().map(|(_, y)| y).sum::<f64>() / rss.len() as f64;
    let per_hour = slope(&rss) * 3600.0;
    let first = settled[0];
    let requests = idle.requests;
    eprintln!(
        "soak: {secs} s at {rate}/s, {requests} requests, {failed} failed; rss {:.1} MiB settled \
         (trend {:+.1} MiB/h); fds {} -> {} idle; tasks {} -> {} idle; threads {} -> {}",
        level / 1048576.0,
        per_hour / 1048576.0,
        first.fds,
        idle.fds,
        first.tasks,
        idle.tasks,
        first.threads,
        idle.threads
    );
    assert_eq!(failed, 0, "requests failed during the soak");
    assert!(
        per_hour < 0.10 * level,
        "memory grows {per_hour} bytes/hour at a level of {level}"
    );
    // Idle, with the clients' kept-alive connections still open: no more descriptors or tasks
    // than when the load had settled (a few requests in flight then, hence the slack of 4), so
    // none leaked over the run.
    assert!(
        idle.fds <= first.fds + 4.0,
        "fds {} -> {}",
        first.fds,
        idle.fds
    );
    assert!(
        idle.tasks <= first.tasks + 4.0,
        "tasks {} -> {}",
        first.tasks,
        idle.tasks
    );

    terminate(&mut guard.0);
    assert!(guard.0.wait().unwrap().success());
}
