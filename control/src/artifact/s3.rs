//! The S3/MinIO blob store (R1), for control replicas that share one store: artifact bytes are
//! objects `PREFIX/blobs/SHA256` of one bucket. Requests are presigned by rusty-s3 (SigV4,
//! sans-IO) and sent with the ureq client control already has, path-style. An upload streams
//! as a multipart upload: one part ([`PART_BYTES`]) is all it holds in memory, whatever the
//! file's size; it becomes the blob only when `publish` completes it, and an upload dropped
//! before that is aborted. A blob smaller than one part goes up as a single PUT at publish.
//! Reads stream the object from an offset (`Range`). Credentials never appear in errors.

use std::time::Duration;

use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use url::Url;

use super::blob::{BlobError, BlobReader, BlobStore, StagedBlob};

/// Bytes buffered per multipart part (S3 wants at least 5 MiB for all parts but the last).
pub const PART_BYTES: usize = 8 * 1024 * 1024;
/// S3's limit on the parts of one upload.
const PARTS_MAX: usize = 10_000;
/// How long a presigned request stays valid.
const PRESIGN: Duration = Duration::from_secs(600);
/// Environment variables holding the credentials (else the usual `AWS_*` ones).
pub const ACCESS_KEY_ENV: &str = "OUTPOST_ARTIFACT_S3_ACCESS_KEY";
pub const SECRET_KEY_ENV: &str = "OUTPOST_ARTIFACT_S3_SECRET_KEY";

/// `--artifact-store s3://BUCKET[/PREFIX]?endpoint=URL[&region=REGION]`, with credentials.
#[derive(Clone, PartialEq)]
pub struct S3Config {
    pub endpoint: String,
    pub bucket: String,
    /// Empty, or ending in `/`.
    pub prefix: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl S3Config {
    /// Parses `s3://BUCKET[/PREFIX]?endpoint=URL[&region=REGION]`; `env` looks up the
    /// credentials. The error names what is wrong and the value seen (never a secret).
    pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let url: Url = text
            .parse()
            .map_err(|e| format!("not a URL ({e}); use s3://BUCKET[/PREFIX]?endpoint=URL"))?;
        if url.scheme() != "s3" {
            return Err("must start with s3://".into());
        }
        let bucket = url.host_str().unwrap_or_default().to_string();
        if bucket.is_empty() {
            return Err("names no bucket (s3://BUCKET/…)".into());
        }
        let mut prefix = url.path().trim_matches('/').to_string();
        if !prefix.is_empty() {
            prefix.push('/');
        }
        let query = |name: &str| {
            url.query_pairs()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.into_owned())
        };
        let endpoint = query("endpoint").ok_or("has no endpoint=URL (the S3 or MinIO server)")?;
        let parsed: Url = endpoint
            .parse()
            .map_err(|e| format!("endpoint {endpoint:?} is not a URL ({e})"))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(format!(
                "endpoint {endpoint:?} must be http(s)://HOST[:PORT]"
            ));
        }
        let credential = |ours: &str, theirs: &str| {
            env(ours)
                .or_else(|| env(theirs))
                .filter(|value| !value.is_empty())
                .ok_or(format!("needs credentials: set {ours} (or {theirs})"))
        };
        Ok(Self {
            endpoint,
            bucket,
            prefix,
            region: query("region").unwrap_or_else(|| "us-east-1".into()),
            access_key: credential(ACCESS_KEY_ENV, "AWS_ACCESS_KEY_ID")?,
            secret_key: credential(SECRET_KEY_ENV, "AWS_SECRET_ACCESS_KEY")?,
        })
    }
}

/// Blobs as S3 objects (see module docs).
#[derive(Clone)]
pub struct S3BlobStore {
    bucket: Bucket,
    prefix: String,
    credentials: Credentials,
    agent: ureq::Agent,
}

fn remote(what: impl Into<String>, reason: impl Into<String>) -> BlobError {
    BlobError::Remote {
        what: what.into(),
        reason: reason.into(),
    }
}

/// A non-2xx answer in words: the status and S3's error code, if any (no URL: it is signed).
fn refused(what: &str, mut response: ureq::http::Response<ureq::Body>) -> BlobError {
    let status = response.status().as_u16();
    let text = response
        .body_mut()
        .with_config()
        .limit(64 * 1024)
        .read_to_string()
        .unwrap_or_default();
    let code = text
        .split("<Code>")
        .nth(1)
        .and_then(|rest| rest.split("</Code>").next())
        .unwrap_or_default();
    remote(what, format!("http {status} {code}").trim_end().to_string())
}

type Answer = ureq::http::Response<ureq::Body>;

impl S3BlobStore {
    pub fn new(config: &S3Config) -> Result<Self, BlobError> {
        let endpoint: Url = config
            .endpoint
            .parse()
            .map_err(|e| remote("configure", format!("endpoint is not a URL: {e}")))?;
        let bucket = Bucket::new(
            endpoint,
            UrlStyle::Path,
            config.bucket.clone(),
            config.region.clone(),
        )
        .map_err(|e| remote("configure", format!("bucket {}: {e}", config.bucket)))?;
        // No global timeout: a download streams as fast as the agent reads it.
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Self {
            bucket,
            prefix: config.prefix.clone(),
            credentials: Credentials::new(config.access_key.clone(), config.secret_key.clone()),
            agent,
        })
    }

    fn key(&self, sha256: &str) -> String {
        format!("{}blobs/{sha256}", self.prefix)
    }

    fn sent(what: &str, result: Result<Answer, ureq::Error>) -> Result<Answer, BlobError> {
        result.map_err(|e| remote(what, e.to_string()))
    }

    /// Creates the bucket unless it exists already (control calls this at start).
    pub fn ensure_bucket(&self) -> Result<(), BlobError> {
        let what = format!("create bucket {}", self.bucket.name());
        let url = self.bucket.create_bucket(&self.credentials).sign(PRESIGN);
        let answer = Self::sent(&what, self.agent.put(url.as_str()).send_empty())?;
        match answer.status().as_u16() {
            200..=299 => Ok(()),
            409 => {
                let error = refused(&what, answer);
                match &error {
                    BlobError::Remote { reason, .. } if reason.contains("OwnedByYou") => Ok(()),
                    _ => Err(error),
                }
            }
            _ => Err(refused(&what, answer)),
        }
    }

    fn head(&self, sha256: &str) -> Result<Option<u64>, BlobError> {
        let what = format!("head blobs/{sha256}");
        let key = self.key(sha256);
        let url = self
            .bucket
            .head_object(Some(&self.credentials), &key)
            .sign(PRESIGN);
        let answer = Self::sent(&what, self.agent.head(url.as_str()).call())?;
        match answer.status().as_u16() {
            404 => Ok(None),
            200 => answer
                .headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .map(Some)
                .ok_or_else(|| remote(what, "no content-length")),
            _ => Err(refused(&what, answer)),
        }
    }
}

impl BlobStore for S3BlobStore {
    fn stage(&self, sha256: &str) -> Result<Box<dyn StagedBlob>, BlobError> {
        Ok(Box::new(S3Upload {
            store: self.clone(),
            sha256: sha256.to_string(),
            buffer: Vec::new(),
            upload_id: None,
            etags: Vec::new(),
        }))
    }

    fn open(&self, sha256: &str, offset: u64) -> Result<Option<BlobReader>, BlobError> {
        let Some(size_bytes) = self.head(sha256)? else {
            return Ok(None);
        };
        if offset >= size_bytes {
            return Ok(Some(BlobReader {
                reader: Box::new(std::io::empty()),
                size_bytes,
            }));
        }
        let what = format!("get blobs/{sha256} from {offset}");
        let key = self.key(sha256);
        let url = self
            .bucket
            .get_object(Some(&self.credentials), &key)
            .sign(PRESIGN);
        let answer = Self::sent(
            &what,
            self.agent
                .get(url.as_str())
                .header("range", format!("bytes={offset}-"))
                .call(),
        )?;
        match answer.status().as_u16() {
            206 => {}
            200 if offset == 0 => {}
            404 => return Ok(None),
            _ => return Err(refused(&what, answer)),
        }
        Ok(Some(BlobReader {
            reader: Box::new(answer.into_body().into_reader()),
            size_bytes,
        }))
    }

    fn size(&self, sha256: &str) -> Result<Option<u64>, BlobError> {
        self.head(sha256)
    }

    fn remove(&self, sha256: &str) -> Result<(), BlobError> {
        let what = format!("delete blobs/{sha256}");
        let key = self.key(sha256);
        let url = self
            .bucket
            .delete_object(Some(&self.credentials), &key)
            .sign(PRESIGN);
        let answer = Self::sent(&what, self.agent.delete(url.as_str()).call())?;
        match answer.status().as_u16() {
            200..=299 | 404 => Ok(()),
            _ => Err(refused(&what, answer)),
        }
    }
}

/// An upload in progress: at most one part buffered (see module docs).
struct S3Upload {
    store: S3BlobStore,
    sha256: String,
    buffer: Vec<u8>,
    upload_id: Option<String>,
    etags: Vec<String>,
}

impl S3Upload {
    fn key(&self) -> String {
        self.store.key(&self.sha256)
    }

    fn upload_id(&mut self) -> Result<String, BlobError> {
        if let Some(id) = &self.upload_id {
            return Ok(id.clone());
        }
        let what = format!("start upload of blobs/{}", self.sha256);
        let key = self.key();
        let url = self
            .store
            .bucket
            .create_multipart_upload(Some(&self.store.credentials), &key)
            .sign(PRESIGN);
        let answer = S3BlobStore::sent(&what, self.store.agent.post(url.as_str()).send_empty())?;
        if answer.status().as_u16() != 200 {
            return Err(refused(&what, answer));
        }
        let text = answer
            .into_body()
            .with_config()
            .limit(64 * 1024)
            .read_to_string()
            .map_err(|e| remote(&what, e.to_string()))?;
        let created = rusty_s3::actions::CreateMultipartUpload::parse_response(&text)
            .map_err(|e| remote(&what, format!("unreadable answer: {e}")))?;
        let id = created.upload_id().to_string();
        self.upload_id = Some(id.clone());
        Ok(id)
    }

    fn send_part(&mut self) -> Result<(), BlobError> {
        if self.etags.len() >= PARTS_MAX {
            return Err(remote(
                format!("upload blobs/{}", self.sha256),
                format!("more than {PARTS_MAX} parts of {PART_BYTES} bytes"),
            ));
        }
        let upload_id = self.upload_id()?;
        let number = self.etags.len() + 1;
        let what = format!("upload part {number} of blobs/{}", self.sha256);
        let key = self.key();
        let url = self
            .store
            .bucket
            .upload_part(
                Some(&self.store.credentials),
                &key,
                u16::try_from(number).unwrap_or(u16::MAX),
                &upload_id,
            )
            .sign(PRESIGN);
        let answer = S3BlobStore::sent(
            &what,
            self.store.agent.put(url.as_str()).send(&self.buffer[..]),
        )?;
        if answer.status().as_u16() != 200 {
            return Err(refused(&what, answer));
        }
        let etag = answer
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| remote(&what, "no etag in the answer"))?
            .to_string();
        self.etags.push(etag);
        self.buffer.clear();
        Ok(())
    }
}

impl StagedBlob for S3Upload {
    fn write_chunk(&mut self, bytes: &[u8]) -> Result<(), BlobError> {
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= PART_BYTES {
            self.send_part()?;
        }
        Ok(())
    }

    fn publish(mut self: Box<Self>) -> Result<(), BlobError> {
        let key = self.key();
        if self.upload_id.is_none() {
            let what = format!("put blobs/{}", self.sha256);
            let url = self
                .store
                .bucket
                .put_object(Some(&self.store.credentials), &key)
                .sign(PRESIGN);
            let answer = S3BlobStore::sent(
                &what,
                self.store.agent.put(url.as_str()).send(&self.buffer[..]),
            )?;
            return match answer.status().as_u16() {
                200..=299 => Ok(()),
                _ => Err(refused(&what, answer)),
            };
        }
        if !self.buffer.is_empty() {
            self.send_part()?;
        }
        let upload_id = self.upload_id()?;
        let what = format!("complete upload of blobs/{}", self.sha256);
        let action = self.store.bucket.complete_multipart_upload(
            Some(&self.store.credentials),
            &key,
            &upload_id,
            self.etags.iter().map(String::as_str),
        );
        let url = action.sign(PRESIGN);
        let body = action.body();
        let answer = S3BlobStore::sent(&what, self.store.agent.post(url.as_str()).send(&body))?;
        let status = answer.status().as_u16();
        // S3 may answer 200 with an error document when completing fails late.
        let mut answer = answer;
        let text = answer
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_to_string()
            .unwrap_or_default();
        if status != 200 || text.contains("<Error>") {
            return Err(remote(what, format!("http {status}")));
        }
        // Completed: nothing left for drop to abort.
        self.upload_id = None;
        Ok(())
    }
}

impl Drop for S3Upload {
    fn drop(&mut self) {
        let Some(upload_id) = self.upload_id.take() else {
            return;
        };
        let key = self.key();
        let url = self
            .store
            .bucket
            .abort_multipart_upload(Some(&self.store.credentials), &key, &upload_id)
            .sign(PRESIGN);
        let _ = self.store.agent.delete(url.as_str()).call().map(|mut a| {
            let _ = a.body_mut().read_to_vec();
        });
    }
}

/// Listing what a bucket holds (tests): object keys under the prefix and open multipart uploads.
#[cfg(test)]
impl S3BlobStore {
    pub(crate) fn stored_keys(&self) -> Vec<String> {
        let url = self
            .bucket
            .list_objects_v2(Some(&self.credentials))
            .sign(PRESIGN);
        let mut answer = self.agent.get(url.as_str()).call().unwrap();
        let text = answer.body_mut().read_to_string().unwrap();
        let listed = rusty_s3::actions::ListObjectsV2::parse_response(&text).unwrap();
        let mut keys: Vec<String> = listed.contents.into_iter().map(|o| o.key).collect();
        let uploads = rusty_s3::signing::sign(
            &jiff::Timestamp::now(),
            rusty_s3::Method::Get,
            self.bucket.base_url().clone(),
            self.credentials.key(),
            self.credentials.secret(),
            None,
            self.bucket.region(),
            PRESIGN.as_secs(),
            [("uploads", "")].into_iter(),
            std::iter::empty(),
        );
        let mut answer = self.agent.get(uploads.as_str()).call().unwrap();
        let text = answer.body_mut().read_to_string().unwrap();
        keys.extend(
            text.split("<Key>")
                .skip(1)
                .filter_map(|rest| rest.split("</Key>").next())
                .map(|key| format!("upload of {key}")),
        );
        keys
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    /// A fake S3: moto's server (`scripts/setup` installs it from PyPI), standing in for S3 or
    /// MinIO, which cannot be installed here. It speaks the S3 REST protocol on loopback.
    pub struct MotoServer {
        child: std::process::Child,
        pub endpoint: String,
    }

    impl MotoServer {
        pub fn start() -> Self {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
                .to_string();
            let args = ["-H", "127.0.0.1", "-p", port.as_str()];
            let quiet = |command: &mut std::process::Command| {
                command
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
            };
            let child = quiet(std::process::Command::new("moto_server").args(args))
                .or_else(|_| {
                    quiet(
                        std::process::Command::new("python3")
                            .args(["-m", "moto.server"])
                            .args(args),
                    )
                })
                .expect("cannot start moto_server; run scripts/setup");
            let mut server = Self {
                child,
                endpoint: format!("http://127.0.0.1:{port}"),
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_err() {
                assert!(
                    server.child.try_wait().unwrap().is_none(),
                    "moto_server exited before listening"
                );
                assert!(
                    std::time::Instant::now() < deadline,
                    "moto_server did not listen"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            server
        }

        /// A store on a fresh bucket of this server.
        pub fn config(&self, bucket: &str) -> S3Config {
            let text = format!("s3://{bucket}/outpost?endpoint={}", self.endpoint);
            let config = S3Config::parse(&text, |name| match name {
                ACCESS_KEY_ENV => Some("test-access".into()),
                SECRET_KEY_ENV => Some("test-secret".into()),
                _ => None,
            })
            .unwrap();
            S3BlobStore::new(&config).unwrap().ensure_bucket().unwrap();
            config
        }
    }

    impl Drop for MotoServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[test]
    fn the_s3_store_keeps_the_contract_and_leaves_no_upload_open() {
        let moto = MotoServer::start();
        let config = moto.config("contract");
        let store = S3BlobStore::new(&config).unwrap();
        // Creating the bucket again is fine (control does it at every start).
        store.ensure_bucket().unwrap();
        super::super::blob::check_contract(&store);
        let mut keys = store.stored_keys();
        keys.sort();
        assert_eq!(keys, vec!["outpost/blobs/big".to_string()]);
    }

    #[test]
    fn settings_name_what_is_wrong_and_never_show_the_secret() {
        let env = |name: &str| match name {
            "AWS_ACCESS_KEY_ID" => Some("AKIDEXAMPLE".into()),
            "AWS_SECRET_ACCESS_KEY" => Some("very-secret-value".into()),
            _ => None,
        };
        let config = S3Config::parse("s3://b/p/q?endpoint=http://127.0.0.1:9000", env).unwrap();
        assert_eq!(
            (config.bucket.as_str(), config.prefix.as_str()),
            ("b", "p/q/")
        );
        assert_eq!(config.region, "us-east-1");
        assert!(!format!("{config:?}").contains("very-secret-value"));
        for (text, says) in [
            ("s3://b", "endpoint=URL"),
            ("s3://b?endpoint=ftp://x", "must be http(s)"),
            ("s3:///p?endpoint=http://h", "bucket"),
            ("http://b?endpoint=http://h", "s3://"),
        ] {
            let error = S3Config::parse(text, env).unwrap_err();
            assert!(error.contains(says), "{text}: {error}");
        }
        let error = S3Config::parse("s3://b?endpoint=http://h", |_| None).unwrap_err();
        assert!(
            error.contains(SECRET_KEY_ENV) || error.contains(ACCESS_KEY_ENV),
            "{error}"
        );
    }
}
