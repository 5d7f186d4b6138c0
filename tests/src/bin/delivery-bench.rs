//! Delivery benchmark (prints figures, asserts nothing): pushes an artifact with `outpostctl
//! artifacts push`, then fans it out twice: to N concurrent downloaders over TLS on loopback
//! (control's serving path alone), and to N real `outpost-agent` processes, each enrolled, whose
//! plans reference the artifact through a `replicas: all` service (fetch with the node
//! credential, sha256 check, unpack into the cache). It prints MiB/s into control, aggregate
//! MiB/s out for both, control's RSS before and during each fan-out (for two file sizes, to show
//! it does not grow with the file), and what resuming from the middle costs compared with a
//! whole download.
//!
//! `cargo build --release --bins -p outpost-control && OUTPOST_BIN_DIR=target/release \
//!  cargo run --release -p outpost-fleet-tests --bin delivery-bench [SIZE_MIB] [DOWNLOADERS]
//!  [ARTIFACT_STORE]` (ARTIFACT_STORE: control's `--artifact-store`, e.g. an S3 bucket).

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outpost_fleet_tests::{AgentProcess, ControlProcess, TestDir};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn agent_for(ca_file: &std::path::Path) -> Result<ureq::Agent> {
    let pem = std::fs::read(ca_file)?;
    let mut certificates = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let ureq::tls::PemItem::Certificate(certificate) = item? {
            certificates.push(certificate);
        }
    }
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(certificates)))
        .build();
    Ok(ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .build()
        .into())
}

/// Downloads from `offset`, returns the bytes read and the time to the first byte.
fn download(
    agent: &ureq::Agent,
    url: &str,
    token: &str,
    offset: Option<u64>,
) -> Result<(u64, Duration)> {
    let started = Instant::now();
    let mut request = agent
        .get(url)
        .header("authorization", format!("Bearer {token}"));
    if let Some(offset) = offset {
        request = request.header("range", format!("bytes={offset}-"));
    }
    let mut response = request.call()?;
    let status = response.status().as_u16();
    if status != 200 && status != 206 {
        bail!("GET {url} answered {status}");
    }
    let mut reader = response.body_mut().with_config().reader();
    let mut buffer = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    let mut first_byte = None;
    loop {
        let read = reader.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        first_byte.get_or_insert_with(|| started.elapsed());
        total += read as u64;
    }
    Ok((total, first_byte.unwrap_or_default()))
}

struct Figures {
    size_mib: u64,
    push_mib_per_s: f64,
    fan_out_mib_per_s: f64,
    rss_before_kib: u64,
    rss_peak_kib: u64,
    agents_mib_per_s: f64,
    agents_rss_peak_kib: u64,
    whole_secs: f64,
    resume_secs: f64,
    resume_first_byte_ms: f64,
}

fn run(size_mib: u64, downloaders: usize, store: Option<&str>) -> Result<Figures> {
    let dir = TestDir::new("delivery-bench")?;
    let max_bytes = (size_mib << 21).to_string();
    let mut args = vec!["--artifact-max-bytes", max_bytes.as_str()];
    if let Some(store) = store {
        args.extend(["--artifact-store", store]);
    }
    let control = ControlProcess::start_with(&dir.path().join("control"), "127.0.0.1:0", &args)?;
    let pid = control.guard.pid().context("control pid")?;
    let file = dir.path().join("artifact.bin");
    {
        // Incompressible bytes from a small xorshift generator.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut bytes = Vec::with_capacity((size_mib << 20) as usize);
        while bytes.len() < (size_mib << 20) as usize {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            bytes.extend_from_slice(&state.to_le_bytes());
        }
        std::fs::write(&file, &bytes)?;
    }
    let started = Instant::now();
    let pushed = control
        .outpostctl(&["artifacts", "push", &file.display().to_string(), "--json"])?
        .expect_success("artifacts push")?
        .json()?;
    let push_secs = started.elapsed().as_secs_f64();
    let sha256 = pushed["sha256"].as_str().context("sha256")?.to_string();
    let url = format!("{}/v1/artifacts/{sha256}", control.url);
    let token = control.admin.token.clone();
    let agent = agent_for(&control.admin.ca_file)?;

    let rss_before_kib = rss_kib(pid);
    let peak = Arc::new(AtomicU64::new(rss_before_kib));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                peak.fetch_max(rss_kib(pid), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let started = Instant::now();
    let handles: Vec<_> = (0..downloaders)
        .map(|_| {
            let (agent, url, token) = (agent.clone(), url.clone(), token.clone());
            std::thread::spawn(move || download(&agent, &url, &token, None))
        })
        .collect();
    let mut total = 0u64;
    for handle in handles {
        total += handle
            .join()
            .map_err(|_| anyhow::anyhow!("downloader panicked"))??
            .0;
    }
    let fan_out_secs = started.elapsed().as_secs_f64();
    done.store(true, Ordering::SeqCst);
    let _ = sampler.join();
    let rss_peak_kib = peak.load(Ordering::SeqCst);
    if total != (size_mib << 20) * downloaders as u64 {
        bail!(
            "downloaded {total} bytes, expected {}",
            (size_mib << 20) * downloaders as u64
        );
    }

    let started = Instant::now();
    download(&agent, &url, &token, None)?;
    let whole_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let (_, first_byte) = download(&agent, &url, &token, Some((size_mib << 20) / 2))?;
    let resume_secs = started.elapsed().as_secs_f64();
    let (agents_secs, agents_rss_peak_kib) =
        fan_out_to_agents(&dir, &control, pid, &sha256, downloaders)?;
    Ok(Figures {
        size_mib,
        push_mib_per_s: size_mib as f64 / push_secs,
        fan_out_mib_per_s: total as f64 / 1048576.0 / fan_out_secs,
        rss_before_kib,
        rss_peak_kib,
        agents_mib_per_s: (size_mib * downloaders as u64) as f64 / agents_secs,
        agents_rss_peak_kib,
        whole_secs,
        resume_secs,
        resume_first_byte_ms: first_byte.as_secs_f64() * 1000.0,
    })
}

/// Enrolls `count` real agents, waits for them to be ready, then applies a `replicas: all`
/// service that references the artifact and times the command until every agent holds it
/// unpacked and verified in its cache. Returns those seconds and control's peak RSS meanwhile.
fn fan_out_to_agents(
    dir: &TestDir,
    control: &ControlProcess,
    pid: u32,
    sha256: &str,
    count: usize,
) -> Result<(f64, u64)> {
    let ids: Vec<String> = (0..count).map(|i| format!("bench-{i}")).collect();
    let mut agents = Vec::new();
    for id in &ids {
        agents.push(AgentProcess::start(
            &dir.path().join(id),
            &control.enrollment_token()?,
            &["--node-id", id],
        )?);
    }
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    control.wait_for_nodes_ready(&id_refs)?;
    let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                peak.fetch_max(rss_kib(pid), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    // The process itself does not matter (the artifact is random bytes): what is timed is the
    // artifact reaching every cache, which the agent does before it starts the process.
    let service = serde_json::json!({
        "name": "fan-out",
        "command": "/bin/sleep",
        "args": ["3600"],
        "replicas": "all",
        "memory_bytes": 1048576,
        "artifact": {"sha256": sha256},
    })
    .to_string();
    let started = Instant::now();
    control
        .apply_services(&service)?
        .expect_success("services apply")?;
    let manifests: Vec<_> = agents
        .iter()
        .map(|agent| {
            agent
                .data_dir
                .join("artifacts/unpacked")
                .join(format!("{sha256}.manifest"))
        })
        .collect();
    // Polled every 10 ms (not the harness's growing interval), so the time is the fan-out's.
    let deadline = started + Duration::from_secs(600);
    while !manifests.iter().all(|m| m.is_file()) {
        if Instant::now() > deadline {
            done.store(true, Ordering::SeqCst);
            bail!("not every agent held the artifact after 600 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let secs = started.elapsed().as_secs_f64();
    done.store(true, Ordering::SeqCst);
    let _ = sampler.join();
    // Dropping the agents stops them and their workloads.
    drop(agents);
    Ok((secs, peak.load(Ordering::SeqCst)))
}

fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    let size_mib: u64 = args.get(1).map_or(Ok(50), |a| a.parse())?;
    let downloaders: usize = args.get(2).map_or(Ok(20), |a| a.parse())?;
    // An `--artifact-store` for control (e.g. s3://bench?endpoint=http://127.0.0.1:PORT, with
    // the credentials in control's environment); the directory store when absent.
    let store = args.get(3).map(String::as_str);
    println!(
        "delivery bench: {downloaders} concurrent downloaders over TLS on loopback, store {}",
        store.unwrap_or("DATA_DIR/artifacts")
    );
    println!(
        "{:>8} {:>14} {:>18} {:>12} {:>12} {:>10} {:>16} {:>16} {:>14} {:>18}",
        "MiB",
        "push MiB/s",
        "fan-out MiB/s",
        "RSS before",
        "RSS peak",
        "whole s",
        "resume half s",
        "resume TTFB ms",
        "agents MiB/s",
        "RSS peak (agents)"
    );
    for size in [size_mib / 10, size_mib] {
        let f = run(size.max(1), downloaders, store)?;
        println!(
            "{:>8} {:>14.1} {:>18.1} {:>9} KiB {:>8} KiB {:>10.3} {:>16.3} {:>16.1} {:>14.1} {:>14} KiB",
            f.size_mib,
            f.push_mib_per_s,
            f.fan_out_mib_per_s,
            f.rss_before_kib,
            f.rss_peak_kib,
            f.whole_secs,
            f.resume_secs,
            f.resume_first_byte_ms,
            f.agents_mib_per_s,
            f.agents_rss_peak_kib
        );
    }
    Ok(())
}
