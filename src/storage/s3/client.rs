//! A blocking client for one S3-compatible bucket: rusty-s3 builds each request's URL
//! (path-style) and parses listings, [`super::sigv4`] signs it in the `Authorization` header,
//! ureq sends it. Every call is retried with exponential backoff on network errors, 5xx and
//! throttling; 4xx answers (bad credentials, missing bucket) are final.

use std::fmt;
use std::io::Read;
use std::time::Duration;

use rusty_s3::actions::{ListObjectsV2, ListObjectsV2Response};
use rusty_s3::{Bucket, S3Action, UrlStyle};

use super::sigv4::{self, Signer};
use super::S3Config;

/// rusty-s3 wants a validity for URLs it would presign; ours are signed in a header instead.
const URL_TTL: Duration = Duration::from_secs(60);
/// Time allowed for one request, body included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// First pause between retries (doubled each time).
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// Why a request failed, naming what it was about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Error {
    /// What was attempted (`PUT s3://bucket/key`).
    pub what: String,
    /// The HTTP status, if the store answered.
    pub status: Option<u16>,
    /// The store's message or the transport error.
    pub detail: String,
}

impl fmt::Display for S3Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(s) => write!(f, "{} failed: HTTP {s} {}", self.what, self.detail),
            None => write!(f, "{} failed: {}", self.what, self.detail),
        }
    }
}

impl S3Error {
    /// True for answers retrying cannot fix (credentials refused, bucket missing...).
    pub fn is_final(&self) -> bool {
        matches!(self.status, Some(s) if (400..500).contains(&s) && s != 408 && s != 429)
    }
}

/// The `<Code>`/`<Message>` of an S3 error document, or its start.
fn error_detail(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let start = text.find(&open)? + open.len();
        let end = text[start..].find('<')? + start;
        Some(text[start..end].to_string())
    };
    match (tag("Code"), tag("Message")) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c,
        _ => text.chars().take(200).collect(),
    }
}

/// URI-encodes `s` as SigV4 wants it: everything but `A-Za-z0-9-_.~`.
fn uri_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One bucket and the credentials to use it.
#[derive(Debug)]
pub struct BucketClient {
    bucket: Bucket,
    key_id: String,
    secret: String,
    region: String,
    agent: ureq::Agent,
    retries: u32,
    name: String,
}

impl BucketClient {
    /// A client for `config`'s bucket (no request is made).
    pub fn new(config: &S3Config) -> Result<BucketClient, String> {
        let endpoint = config
            .api_url
            .parse()
            .map_err(|e| format!("invalid NUN_S3_API_URL {}: {e}", config.api_url))?;
        let bucket = Bucket::new(
            endpoint,
            UrlStyle::Path,
            config.bucket.clone(),
            config.region.clone(),
        )
        .map_err(|e| format!("invalid S3 endpoint {}: {e}", config.api_url))?;
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(REQUEST_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(BucketClient {
            bucket,
            key_id: config.key_id.clone(),
            secret: config.secret_key.clone(),
            region: config.region.clone(),
            agent,
            retries: config.retry,
            name: config.bucket.clone(),
        })
    }

    fn what(&self, verb: &str, key: &str) -> String {
        format!("{verb} s3://{}/{key}", self.name)
    }

    /// Runs `attempt` until it succeeds, fails finally, or the retries are spent.
    fn retrying<T>(&self, mut attempt: impl FnMut() -> Result<T, S3Error>) -> Result<T, S3Error> {
        let mut pause = FIRST_BACKOFF;
        let mut tries = 0;
        loop {
            match attempt() {
                Ok(v) => return Ok(v),
                Err(e) if e.is_final() || tries >= self.retries => return Err(e),
                Err(e) => {
                    log::debug!("{e}; retrying in {pause:?}");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(10));
                    tries += 1;
                }
            }
        }
    }

    /// Signs and sends one request to `url` (unsigned, as rusty-s3 builds it): (status, body).
    fn send(
        &self,
        what: &str,
        method: &str,
        url: &url::Url,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), S3Error> {
        let fail = |detail: String| S3Error {
            what: what.to_string(),
            status: None,
            detail,
        };
        let host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            (None, _) => return Err(fail("the endpoint has no host".into())),
        };
        // Query parameters re-encoded as SigV4 wants them, and sent exactly so.
        let query: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| (uri_encode(&k), uri_encode(&v)))
            .collect();
        let mut sorted = query.clone();
        sorted.sort();
        let query_text: Vec<String> = sorted.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let target = format!(
            "{}://{host}{}{}{}",
            url.scheme(),
            url.path(),
            if query_text.is_empty() { "" } else { "?" },
            query_text.join("&")
        );
        let empty_hash;
        let payload_hash = match body {
            Some(_) => sigv4::UNSIGNED_PAYLOAD,
            None => {
                empty_hash = sigv4::sha256_hex(b"");
                &empty_hash
            }
        };
        let amz_date = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
        let authorization = Signer {
            key_id: &self.key_id,
            secret: &self.secret,
            region: &self.region,
        }
        .authorization(&sigv4::Request {
            method,
            host: &host,
            path: url.path(),
            query,
            headers: Vec::new(),
            payload_hash,
            amz_date: &amz_date,
        });
        let response = match (method, body) {
            ("PUT", Some(b)) => self
                .agent
                .put(&target)
                .header("x-amz-date", &amz_date)
                .header("x-amz-content-sha256", payload_hash)
                .header("authorization", &authorization)
                .send(b),
            (m, _) => {
                let request = if m == "DELETE" {
                    self.agent.delete(&target)
                } else {
                    self.agent.get(&target)
                };
                request
                    .header("x-amz-date", &amz_date)
                    .header("x-amz-content-sha256", payload_hash)
                    .header("authorization", &authorization)
                    .call()
            }
        };
        let mut response = response.map_err(|e| fail(e.to_string()))?;
        let status = response.status().as_u16();
        let mut bytes = Vec::new();
        response
            .body_mut()
            .as_reader()
            .read_to_end(&mut bytes)
            .map_err(|e| fail(format!("reading the answer: {e}")))?;
        Ok((status, bytes))
    }

    fn check(what: &str, status: u16, body: &[u8], ok: &[u16]) -> Result<(), S3Error> {
        if ok.contains(&status) {
            Ok(())
        } else {
            Err(S3Error {
                what: what.to_string(),
                status: Some(status),
                detail: error_detail(body),
            })
        }
    }

    /// The object at `key`, or `None` if there is none.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, S3Error> {
        let what = self.what("GET", key);
        self.retrying(|| {
            let url = self.bucket.get_object(None, key).sign(URL_TTL);
            let (status, body) = self.send(&what, "GET", &url, None)?;
            if status == 404 {
                return Ok(None);
            }
            Self::check(&what, status, &body, &[200])?;
            Ok(Some(body))
        })
    }

    /// Stores `body` at `key`.
    pub fn put(&self, key: &str, body: &[u8]) -> Result<(), S3Error> {
        let what = self.what("PUT", key);
        self.retrying(|| {
            let url = self.bucket.put_object(None, key).sign(URL_TTL);
            let (status, answer) = self.send(&what, "PUT", &url, Some(body))?;
            Self::check(&what, status, &answer, &[200])
        })
    }

    /// Deletes `key` (no error if it is already gone).
    pub fn delete(&self, key: &str) -> Result<(), S3Error> {
        let what = self.what("DELETE", key);
        self.retrying(|| {
            let url = self.bucket.delete_object(None, key).sign(URL_TTL);
            let (status, answer) = self.send(&what, "DELETE", &url, None)?;
            Self::check(&what, status, &answer, &[200, 204, 404])
        })
    }

    /// Every object (key, size) whose key starts with `prefix`, in key order.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, S3Error> {
        let what = self.what("LIST", prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page: ListObjectsV2Response = self.retrying(|| {
                let mut action = ListObjectsV2::new(&self.bucket, None);
                action.with_prefix(prefix);
                if let Some(t) = &token {
                    action.with_continuation_token(t.clone());
                }
                let url = action.sign(URL_TTL);
                let (status, body) = self.send(&what, "GET", &url, None)?;
                Self::check(&what, status, &body, &[200])?;
                ListObjectsV2::parse_response(&body).map_err(|e| S3Error {
                    what: what.clone(),
                    status: Some(status),
                    detail: format!("unreadable listing: {e}"),
                })
            })?;
            out.extend(page.contents.into_iter().map(|c| (c.key, c.size)));
            match page.next_continuation_token {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
    }
}
