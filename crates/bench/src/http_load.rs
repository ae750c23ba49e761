//! The HTTP load generators the serve and LB benches drive: wrk for HTTP/1.1 and nghttp2's
//! h2load for HTTP/2 (what browsers speak to the broadcasts), both from Debian, both read into
//! one [`LoadResult`] so a table can put their rounds side by side.
//!
//! h2load prints no percentiles; its per-request log (`--log-file`: start, status, duration in
//! microseconds) gives the same 99th percentile wrk prints.

use std::path::Path;

use anyhow::{Context, bail};

use crate::affinity::Cpus;

/// Which client asks, and so which protocol the server answers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 keep-alive, wrk.
    Http1,
    /// HTTP/2, one stream at a time per connection, h2load.
    Http2,
}

impl Protocol {
    pub fn tool(self) -> &'static str {
        match self {
            Self::Http1 => "wrk",
            Self::Http2 => "h2load",
        }
    }

    /// The Debian package that has [`Self::tool`].
    pub fn package(self) -> &'static str {
        match self {
            Self::Http1 => "wrk",
            Self::Http2 => "nghttp2-client",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Http1 => "HTTP/1.1",
            Self::Http2 => "HTTP/2",
        }
    }
}

/// What one load run reported.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct LoadResult {
    /// Requests answered.
    pub requests: u64,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub p99_ms: f64,
    /// Answers other than 2xx/3xx.
    pub non_success: u64,
    /// Requests lost without an answer (connection errors, resets, timeouts).
    pub socket_errors: u64,
}

/// One run of `protocol`'s client against `url`: `connections` kept open, each asking again as
/// soon as it has its answer, for `seconds`, on `cpus`; `work` holds h2load's log.
pub(crate) async fn run(
    protocol: Protocol,
    url: &str,
    connections: u32,
    seconds: u64,
    cpus: &Cpus,
    work: &Path,
) -> anyhow::Result<LoadResult> {
    match protocol {
        Protocol::Http1 => run_wrk(url, connections, seconds, cpus, &[]).await,
        Protocol::Http2 => run_h2load(url, connections, seconds, cpus, work).await,
    }
}

pub(crate) async fn run_wrk(
    url: &str,
    connections: u32,
    seconds: u64,
    cpus: &Cpus,
    headers: &[&str],
) -> anyhow::Result<LoadResult> {
    let mut wrk = tokio::process::Command::new("wrk");
    cpus.apply(&mut wrk);
    wrk.args(headers.iter().flat_map(|h| ["-H", h]))
        .arg(format!("-t{}", cpus.threads()))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .arg("--latency")
        .arg(url);
    let text = report_of(wrk, "wrk").await?;
    parse_wrk(&text).with_context(|| format!("cannot read wrk's report:\n{text}"))
}

async fn run_h2load(
    url: &str,
    connections: u32,
    seconds: u64,
    cpus: &Cpus,
    work: &Path,
) -> anyhow::Result<LoadResult> {
    let log = work.join("h2load.log");
    let mut h2load = tokio::process::Command::new("h2load");
    cpus.apply(&mut h2load);
    h2load
        .arg(format!("--threads={}", cpus.threads()))
        .arg(format!("--clients={connections}"))
        .arg("--max-concurrent-streams=1")
        .arg(format!("--duration={seconds}"))
        // h2load's warm-up lets every connection finish its handshake before counting, as
        // wrk's connections are open before its clock starts.
        .arg("--warm-up-time=1")
        .arg(format!("--log-file={}", log.display()))
        .arg(url);
    let text = report_of(h2load, "h2load").await?;
    let mut result =
        parse_h2load(&text).with_context(|| format!("cannot read h2load's report:\n{text}"))?;
    let log = std::fs::read_to_string(&log).context("h2load's request log")?;
    let _ = std::fs::remove_file(work.join("h2load.log"));
    result.p99_ms = p99_of_h2load_log(&log).context("h2load logged no request")?;
    Ok(result)
}

/// Runs a load generator to its end: its report (standard output), or why it failed.
async fn report_of(mut command: tokio::process::Command, tool: &str) -> anyhow::Result<String> {
    let output = command
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("cannot run {tool}"))?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "{tool} failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(text)
}

fn parse_wrk(text: &str) -> Option<LoadResult> {
    let mut r = LoadResult::default();
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [n, "requests", "in", secs, ..] => {
                r.requests = n.parse().ok()?;
                r.seconds = secs
                    .trim_end_matches(',')
                    .trim_end_matches('s')
                    .parse()
                    .ok()?;
            }
            ["Requests/sec:", v] => r.requests_per_second = v.parse().ok()?,
            ["99%", v] => r.p99_ms = duration_ms(v)?,
            ["Non-2xx", "or", "3xx", "responses:", n] => r.non_success = n.parse().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                r.socket_errors = rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            _ => {}
        }
    }
    (r.seconds > 0.0).then_some(r)
}

/// h2load's summary: `finished in 10.00s, 6436.10 req/s, 1.40GB/s` and `requests: 64361 total,
/// 64561 started, 64361 done, 64361 succeeded, 0 failed, 0 errored, 0 timeout`. Its `failed`
/// counts HTTP failures and `errored` ones alike; `errored` alone are the lost requests.
fn parse_h2load(text: &str) -> Option<LoadResult> {
    let mut r = LoadResult::default();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            let mut fields = rest.split(", ");
            let secs = fields.next()?;
            r.seconds = duration_ms(secs)? / 1000.0;
            r.requests_per_second = fields.next()?.strip_suffix(" req/s")?.parse().ok()?;
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            let count = |what: &str| -> Option<u64> {
                rest.split(", ")
                    .find_map(|f| f.strip_suffix(what))?
                    .trim()
                    .parse()
                    .ok()
            };
            r.requests = count(" done")?;
            let failed = count(" failed")?;
            let errored = count(" errored")?;
            r.non_success = failed.saturating_sub(errored);
            r.socket_errors = errored + count(" timeout")?;
        }
    }
    (r.seconds > 0.0).then_some(r)
}

/// The 99th percentile of the third column of h2load's log (microseconds), in ms.
fn p99_of_h2load_log(log: &str) -> Option<f64> {
    let mut micros: Vec<u64> = log
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    if micros.is_empty() {
        return None;
    }
    micros.sort_unstable();
    let rank = (micros.len() * 99).div_ceil(100).max(1) - 1;
    Some(micros[rank] as f64 / 1000.0)
}

/// wrk's and h2load's durations: `850.00us`, `12.34ms`, `1.02s`, `2.00m`.
fn duration_ms(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_reports_are_read() {
        let text = "Running 10s test @ https://127.75.2.1:8443/live/test/360p/1.m4s?t=x
  2 threads and 200 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   120.50ms   30.20ms   1.20s    80.00%
    Req/Sec   830.10    100.20     1.00k    70.00%
  Latency Distribution
     50%  110.00ms
     75%  130.00ms
     90%  160.00ms
     99%    1.02s
  16602 requests in 10.01s, 9.10GB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 4
Requests/sec:   1658.54
Transfer/sec:    930.90MB
";
        assert_eq!(
            parse_wrk(text),
            Some(LoadResult {
                requests: 16602,
                seconds: 10.01,
                requests_per_second: 1658.54,
                p99_ms: 1020.0,
                non_success: 4,
                socket_errors: 5,
            })
        );
        assert_eq!(parse_wrk("garbage"), None);
        assert_eq!(duration_ms("850.00us"), Some(0.85));
        assert_eq!(duration_ms("2.00m"), Some(120_000.0));
    }

    #[test]
    fn h2load_reports_are_read() {
        let text = "starting benchmark...
spawning thread #0: 100 total client(s). Timing-based test with 1s of warm-up time and 10s of main duration for measurements.
TLS Protocol: TLSv1.3
Cipher: TLS_AES_256_GCM_SHA384
Server Temp Key: X25519 253 bits
Application protocol: h2
Warm-up phase is over for thread #0.
Main benchmark duration is over for thread #0. Stopping all clients.

finished in 10.00s, 5321.40 req/s, 1.15GB/s
requests: 53214 total, 53414 started, 53214 done, 53200 succeeded, 20 failed, 6 errored, 2 timeout
status codes: 53200 2xx, 0 3xx, 14 4xx, 0 5xx
traffic: 11.52GB (12371263812) total, 1.02MB (1069345) headers (space savings 36.21%), 11.51GB (12360000000) data
                     min         max         mean         sd        +/- sd
time for request:     1.20ms    120.33ms     37.51ms     10.12ms    70.11%
";
        assert_eq!(
            parse_h2load(text),
            Some(LoadResult {
                requests: 53214,
                seconds: 10.0,
                requests_per_second: 5321.4,
                p99_ms: 0.0,
                non_success: 14,
                socket_errors: 8,
            })
        );
        assert_eq!(parse_h2load("garbage"), None);
    }

    #[test]
    fn h2load_log_gives_the_99th_percentile() {
        let log: String = (1..=200)
            .map(|i| format!("1764758400000000\t200\t{}\n", i * 1000))
            .collect();
        assert_eq!(p99_of_h2load_log(&log), Some(198.0));
        assert_eq!(p99_of_h2load_log("1\t200\t5000\n"), Some(5.0));
        assert_eq!(p99_of_h2load_log(""), None);
    }
}
