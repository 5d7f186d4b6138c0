//! S3/MinIO ObjectStorage adapter (feature `s3`, C2): requests presigned with AWS Signature V4
//! by rusty-s3 (sans-IO), sent with ureq, path-style URLs.
//!
//! - ensure bucket ([`classify_create_bucket`]): 200 and 409 `BucketAlreadyOwnedByYou` are
//!   success; 409 `BucketAlreadyExists` (the name belongs to another account) is an error that
//!   names the bucket. An owner re-creating its bucket gets 200 in `us-east-1` (S3's legacy
//!   behaviour there) and `BucketAlreadyOwnedByYou` in every other region; moto does the same;
//! - versioning: enabled or suspended; a bucket never goes back to unversioned;
//! - lifecycle rules and tags: PUT replaces the whole set, so GET, merge by rule id / tag key,
//!   PUT with Content-MD5; rules and tags Outpost does not manage are sent back unchanged.

use std::collections::BTreeMap;
use std::time::Duration;

use outpost_proto::profile::LifecycleRule;
use rusty_s3::{Bucket, Method, UrlStyle};
use url::Url;

use super::ports::{
    AdapterIdentity, AdapterKind, BucketState, IdempotencyKey, ObjectStorage,
    ObservedLifecycleRule, PortError, VersioningChange, VersioningState,
};
use super::xml::{elements, escape, first_text, raw_elements};

const S3_NS: &str = "http://s3.amazonaws.com/doc/2006-03-01/";
/// How long a presigned request stays valid.
const PRESIGN_EXPIRES_SECS: u64 = 300;
/// Timeout of every S3 call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest control answer (XML) read.
const ANSWER_MAX_BYTES: u64 = 4 * 1024 * 1024;
/// Largest object read back.
const OBJECT_MAX_BYTES: u64 = 512 * 1024 * 1024;
/// Header carrying the idempotency key on bucket-level calls (S3 ignores unknown headers).
const IDEMPOTENCY_HEADER: &str = "x-outpost-idempotency-key";
/// Object metadata header carrying the idempotency key (stored with the object).
const IDEMPOTENCY_META_HEADER: &str = "x-amz-meta-outpost-idempotency-key";

/// An S3 endpoint with credentials.
pub struct S3ObjectStorage {
    endpoint: Url,
    access_key: String,
    secret_key: String,
    region: String,
    agent: ureq::Agent,
}

impl std::fmt::Debug for S3ObjectStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3ObjectStorage")
            .field("endpoint", &self.endpoint.as_str())
            .field("region", &self.region)
            .finish()
    }
}

/// base64 (standard alphabet, padded).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(ALPHABET[(n >> 18) as usize & 63] as char);
        out.push(ALPHABET[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            ALPHABET[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            ALPHABET[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// The `Content-MD5` header value (RFC 1864): base64 of the body's MD5 digest.
pub fn content_md5(body: &[u8]) -> String {
    use md5::Digest;
    base64(&md5::Md5::digest(body))
}

/// Presigns a request (SigV4, query-string auth). `query` must be sorted by name then value;
/// `headers` sorted by lowercase name, and sent with the request exactly as signed.
#[allow(clippy::too_many_arguments)]
pub fn presign(
    time: &jiff::Timestamp,
    method: Method,
    url: Url,
    access_key: &str,
    secret_key: &str,
    region: &str,
    expires_secs: u64,
    query: &[(&str, &str)],
    headers: &[(&str, &str)],
) -> Url {
    rusty_s3::signing::sign(
        time,
        method,
        url,
        access_key,
        secret_key,
        None,
        region,
        expires_secs,
        query.iter().copied(),
        headers.iter().copied(),
    )
}

/// A presigned bucket-level request: the URL to send, and the `Content-MD5` header it was signed
/// with (sent as `content-md5`), if it has a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedBucketRequest {
    pub url: Url,
    pub content_md5: Option<String>,
}

impl SignedBucketRequest {
    /// The headers the signature covers besides `host`, as they must be sent.
    pub fn signed_headers(&self) -> Vec<(&str, &str)> {
        self.content_md5
            .iter()
            .map(|md5| ("content-md5", md5.as_str()))
            .collect()
    }
}

/// One S3 answer: status, body and the error code if it is an S3 error document.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Vec<u8>,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn error_code(&self) -> Option<String> {
        first_text(&self.text(), "Code")
    }

    fn error(&self, operation: &'static str, target: &str) -> PortError {
        let code = self.error_code().unwrap_or_default();
        let message = first_text(&self.text(), "Message").unwrap_or_default();
        let detail = format!("http {} {code} {message}", self.status)
            .trim()
            .to_string();
        if self.status >= 500
            || self.status == 429
            || code == "SlowDown"
            || code == "RequestTimeout"
        {
            PortError::transient(operation, target, detail)
        } else {
            PortError::refused(operation, target, detail)
        }
    }
}

impl S3ObjectStorage {
    pub fn new(
        endpoint: &str,
        access_key: &str,
        secret_key: &str,
        region: &str,
    ) -> Result<Self, PortError> {
        let endpoint: Url = endpoint.parse().map_err(|error| {
            PortError::refused("configure s3", endpoint, format!("not a URL: {error}"))
        })?;
        if !matches!(endpoint.scheme(), "http" | "https") || endpoint.host_str().is_none() {
            return Err(PortError::refused(
                "configure s3",
                endpoint.as_str(),
                "needs an http or https URL with a host",
            ));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(CALL_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Self {
            endpoint,
            access_key: access_key.to_string(),
            secret_key: secret_key.to_string(),
            region: region.to_string(),
            agent,
        })
    }

    fn bucket(&self, operation: &'static str, name: &str) -> Result<Bucket, PortError> {
        Bucket::new(
            self.endpoint.clone(),
            UrlStyle::Path,
            name.to_string(),
            self.region.clone(),
        )
        .map_err(|error| PortError::refused(operation, name, error))
    }

    /// Presigns a request at the current time and sends it.
    #[allow(clippy::too_many_arguments)]
    fn call(
        &self,
        operation: &'static str,
        target: &str,
        method: Method,
        url: Url,
        query: &[(&str, &str)],
        signed_headers: &[(&str, &str)],
        unsigned_headers: &[(&str, &str)],
        body: Option<&[u8]>,
        limit_bytes: u64,
    ) -> Result<Answer, PortError> {
        let now = jiff::Timestamp::now();
        let url = presign(
            &now,
            method,
            url,
            &self.access_key,
            &self.secret_key,
            &self.region,
            PRESIGN_EXPIRES_SECS,
            query,
            signed_headers,
        );
        self.send(
            operation,
            target,
            method,
            &url,
            signed_headers,
            unsigned_headers,
            body,
            limit_bytes,
        )
    }

    /// Sends one presigned request with exactly the headers it was signed with, plus unsigned
    /// ones (S3 ignores headers it does not know).
    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        operation: &'static str,
        target: &str,
        method: Method,
        url: &Url,
        signed_headers: &[(&str, &str)],
        unsigned_headers: &[(&str, &str)],
        body: Option<&[u8]>,
        limit_bytes: u64,
    ) -> Result<Answer, PortError> {
        let uri = url.as_str();
        let response = match (method, body) {
            (Method::Put, body) | (Method::Post, body) => {
                let mut request = if method == Method::Put {
                    self.agent.put(uri)
                } else {
                    self.agent.post(uri)
                };
                for (name, value) in signed_headers.iter().chain(unsigned_headers) {
                    request = request.header(*name, *value);
                }
                request.send(body.unwrap_or_default())
            }
            (method, _) => {
                let mut request = match method {
                    Method::Head => self.agent.head(uri),
                    Method::Delete => self.agent.delete(uri),
                    _ => self.agent.get(uri),
                };
                for (name, value) in signed_headers.iter().chain(unsigned_headers) {
                    request = request.header(*name, *value);
                }
                request.call()
            }
        };
        let mut response =
            response.map_err(|error| PortError::transient(operation, target, error))?;
        let status = response.status().as_u16();
        let body = if method == Method::Head {
            Vec::new()
        } else {
            response
                .body_mut()
                .with_config()
                .limit(limit_bytes)
                .read_to_vec()
                .map_err(|error| PortError::transient(operation, target, error))?
        };
        Ok(Answer { status, body })
    }

    /// The presigned URL and Content-MD5 of a bucket-level request at `time`, exactly as
    /// [`Self::bucket_call`] sends it: path-style `/{bucket}/`, `?{subresource}` (`versioning`,
    /// `lifecycle`, `tagging` or none), and a signed `content-md5` header when there is a body.
    pub fn sign_bucket_request(
        &self,
        time: &jiff::Timestamp,
        operation: &'static str,
        bucket: &str,
        method: Method,
        subresource: &str,
        body: Option<&[u8]>,
    ) -> Result<SignedBucketRequest, PortError> {
        let url = self.bucket(operation, bucket)?.base_url().clone();
        let query: Vec<(&str, &str)> = if subresource.is_empty() {
            Vec::new()
        } else {
            vec![(subresource, "")]
        };
        let mut request = SignedBucketRequest {
            url,
            content_md5: body.map(content_md5),
        };
        request.url = presign(
            time,
            method,
            request.url.clone(),
            &self.access_key,
            &self.secret_key,
            &self.region,
            PRESIGN_EXPIRES_SECS,
            &query,
            &request.signed_headers(),
        );
        Ok(request)
    }

    fn bucket_call(
        &self,
        operation: &'static str,
        bucket: &str,
        method: Method,
        subresource: &str,
        body: Option<&[u8]>,
        key: Option<&IdempotencyKey>,
    ) -> Result<Answer, PortError> {
        let now = jiff::Timestamp::now();
        let request =
            self.sign_bucket_request(&now, operation, bucket, method, subresource, body)?;
        let signed = request.signed_headers();
        let unsigned: Vec<(&str, &str)> = key
            .iter()
            .map(|key| (IDEMPOTENCY_HEADER, key.as_str()))
            .collect();
        self.send(
            operation,
            bucket,
            method,
            &request.url,
            &signed,
            &unsigned,
            body,
            ANSWER_MAX_BYTES,
        )
    }

    fn read_lifecycle_xml(&self, bucket: &str) -> Result<String, PortError> {
        let answer = self.bucket_call(
            "read lifecycle rules",
            bucket,
            Method::Get,
            "lifecycle",
            None,
            None,
        )?;
        match answer.status {
            200 => Ok(answer.text()),
            404 if answer.error_code().as_deref() == Some("NoSuchLifecycleConfiguration") => {
                Ok(String::new())
            }
            _ => Err(answer.error("read lifecycle rules", bucket)),
        }
    }

    fn read_tags(&self, bucket: &str) -> Result<BTreeMap<String, String>, PortError> {
        let answer = self.bucket_call("read tags", bucket, Method::Get, "tagging", None, None)?;
        match answer.status {
            200 => Ok(parse_tags(&answer.text())),
            404 if answer.error_code().as_deref() == Some("NoSuchTagSet") => Ok(BTreeMap::new()),
            _ => Err(answer.error("read tags", bucket)),
        }
    }
}

/// What S3 meant by its answer to `PUT /{bucket}` (CreateBucket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateBucketAnswer {
    /// 200: created. Also an owner re-creating its own bucket in `us-east-1`, where S3 keeps
    /// its legacy behaviour of answering 200 instead of `BucketAlreadyOwnedByYou`.
    Created,
    /// 409 `BucketAlreadyOwnedByYou`: the bucket exists and the caller owns it (any region but
    /// `us-east-1`); ensuring it succeeded.
    AlreadyOwned,
    /// 409 `BucketAlreadyExists`: the name is taken by another account. Bucket names are
    /// global, so this never becomes the caller's bucket: an error.
    TakenByAnotherAccount,
    /// Anything else: an error, reported with S3's code and message.
    Failed,
}

/// Classifies a CreateBucket answer by HTTP status and S3 error code (C2). Pure, so both 409
/// codes are unit-tested; the moto tests check the same answers come over the wire.
pub fn classify_create_bucket(status: u16, error_code: Option<&str>) -> CreateBucketAnswer {
    match (status, error_code) {
        (200, _) => CreateBucketAnswer::Created,
        (409, Some("BucketAlreadyOwnedByYou")) => CreateBucketAnswer::AlreadyOwned,
        (409, Some("BucketAlreadyExists")) => CreateBucketAnswer::TakenByAnotherAccount,
        _ => CreateBucketAnswer::Failed,
    }
}

/// Parses a lifecycle configuration into the rules the diff compares.
pub fn parse_lifecycle(xml: &str) -> Vec<ObservedLifecycleRule> {
    raw_elements(xml, "Rule")
        .into_iter()
        .map(|rule| {
            let expiration = elements(rule, "Expiration").first().copied().unwrap_or("");
            let enabled = first_text(rule, "Status").as_deref() == Some("Enabled");
            let simple_filter =
                elements(rule, "And").is_empty() && elements(rule, "Tag").is_empty();
            ObservedLifecycleRule {
                id: first_text(rule, "ID").unwrap_or_default(),
                prefix: if simple_filter {
                    Some(first_text(rule, "Prefix").unwrap_or_default())
                } else {
                    None
                },
                expire_days: if enabled {
                    first_text(expiration, "Days").and_then(|days| days.parse().ok())
                } else {
                    None
                },
            }
        })
        .collect()
}

/// The configuration to PUT: every existing rule whose id is not in `managed`, verbatim, then
/// the managed rules.
pub fn merge_lifecycle_xml(existing: &str, managed: &[LifecycleRule]) -> String {
    let mut out = format!("<LifecycleConfiguration xmlns=\"{S3_NS}\">");
    for rule in raw_elements(existing, "Rule") {
        let id = first_text(rule, "ID").unwrap_or_default();
        if !managed.iter().any(|managed| managed.id == id) {
            out.push_str(rule);
        }
    }
    for rule in managed {
        out.push_str(&format!(
            "<Rule><ID>{}</ID><Filter><Prefix>{}</Prefix></Filter><Status>Enabled</Status><Expiration><Days>{}</Days></Expiration></Rule>",
            escape(&rule.id),
            escape(&rule.prefix),
            rule.expire_days
        ));
    }
    out.push_str("</LifecycleConfiguration>");
    out
}

pub fn parse_tags(xml: &str) -> BTreeMap<String, String> {
    raw_elements(xml, "Tag")
        .into_iter()
        .filter_map(|tag| {
            Some((
                first_text(tag, "Key")?,
                first_text(tag, "Value").unwrap_or_default(),
            ))
        })
        .collect()
}

pub fn tags_xml(tags: &BTreeMap<String, String>) -> String {
    let mut out = String::from("<Tagging><TagSet>");
    for (key, value) in tags {
        out.push_str(&format!(
            "<Tag><Key>{}</Key><Value>{}</Value></Tag>",
            escape(key),
            escape(value)
        ));
    }
    out.push_str("</TagSet></Tagging>");
    out
}

impl ObjectStorage for S3ObjectStorage {
    fn identity(&self) -> AdapterIdentity {
        AdapterIdentity {
            kind: AdapterKind::S3,
            location: self.endpoint.as_str().trim_end_matches('/').to_string(),
        }
    }

    fn read_bucket(&mut self, bucket: &str) -> Result<Option<BucketState>, PortError> {
        let answer = self.bucket_call("read bucket", bucket, Method::Head, "", None, None)?;
        match answer.status {
            200 => {}
            404 => return Ok(None),
            _ => return Err(answer.error("read bucket", bucket)),
        }
        let answer = self.bucket_call(
            "read versioning",
            bucket,
            Method::Get,
            "versioning",
            None,
            None,
        )?;
        if answer.status != 200 {
            return Err(answer.error("read versioning", bucket));
        }
        let versioning = match first_text(&answer.text(), "Status").as_deref() {
            Some("Enabled") => VersioningState::Enabled,
            Some("Suspended") => VersioningState::Suspended,
            _ => VersioningState::Unversioned,
        };
        let lifecycle = parse_lifecycle(&self.read_lifecycle_xml(bucket)?);
        let tags = self.read_tags(bucket)?;
        Ok(Some(BucketState {
            versioning,
            lifecycle,
            tags,
        }))
    }

    fn create_bucket(&mut self, bucket: &str, key: &IdempotencyKey) -> Result<(), PortError> {
        let configuration = (self.region != "us-east-1").then(|| {
            format!(
                "<CreateBucketConfiguration xmlns=\"{S3_NS}\"><LocationConstraint>{}</LocationConstraint></CreateBucketConfiguration>",
                escape(&self.region)
            )
        });
        let answer = self.bucket_call(
            "create bucket",
            bucket,
            Method::Put,
            "",
            configuration.as_deref().map(str::as_bytes),
            Some(key),
        )?;
        match classify_create_bucket(answer.status, answer.error_code().as_deref()) {
            CreateBucketAnswer::Created | CreateBucketAnswer::AlreadyOwned => Ok(()),
            CreateBucketAnswer::TakenByAnotherAccount => Err(PortError::refused(
                "create bucket",
                bucket,
                format!(
                    "bucket name {bucket:?} is taken by another account (http 409 BucketAlreadyExists); S3 bucket names are global, so the profile needs another name"
                ),
            )),
            CreateBucketAnswer::Failed => Err(answer.error("create bucket", bucket)),
        }
    }

    fn set_versioning(
        &mut self,
        bucket: &str,
        change: VersioningChange,
        key: &IdempotencyKey,
    ) -> Result<(), PortError> {
        let status = match change {
            VersioningChange::Enable => "Enabled",
            VersioningChange::Suspend => "Suspended",
        };
        let body = format!(
            "<VersioningConfiguration xmlns=\"{S3_NS}\"><Status>{status}</Status></VersioningConfiguration>"
        );
        let answer = self.bucket_call(
            "set versioning",
            bucket,
            Method::Put,
            "versioning",
            Some(body.as_bytes()),
            Some(key),
        )?;
        if answer.status == 200 {
            Ok(())
        } else {
            Err(answer.error("set versioning", bucket))
        }
    }

    fn merge_lifecycle_rules(
        &mut self,
        bucket: &str,
        rules: &[LifecycleRule],
        key: &IdempotencyKey,
    ) -> Result<(), PortError> {
        let existing = self.read_lifecycle_xml(bucket)?;
        let body = merge_lifecycle_xml(&existing, rules);
        let answer = self.bucket_call(
            "merge lifecycle rules",
            bucket,
            Method::Put,
            "lifecycle",
            Some(body.as_bytes()),
            Some(key),
        )?;
        if answer.status == 200 {
            Ok(())
        } else {
            Err(answer.error("merge lifecycle rules", bucket))
        }
    }

    fn merge_tags(
        &mut self,
        bucket: &str,
        tags: &BTreeMap<String, String>,
        key: &IdempotencyKey,
    ) -> Result<(), PortError> {
        let mut merged = self.read_tags(bucket)?;
        merged.extend(tags.clone());
        let body = tags_xml(&merged);
        let answer = self.bucket_call(
            "merge tags",
            bucket,
            Method::Put,
            "tagging",
            Some(body.as_bytes()),
            Some(key),
        )?;
        if matches!(answer.status, 200 | 204) {
            Ok(())
        } else {
            Err(answer.error("merge tags", bucket))
        }
    }

    fn put_object(
        &mut self,
        bucket: &str,
        object: &str,
        bytes: &[u8],
        key: &IdempotencyKey,
    ) -> Result<(), PortError> {
        super::fs_storage::check_object_key("put object", object)?;
        let url = self.bucket("put object", bucket)?.object_url(object);
        let md5 = content_md5(bytes);
        let signed = [
            ("content-md5", md5.as_str()),
            (IDEMPOTENCY_META_HEADER, key.as_str()),
        ];
        let target = format!("{bucket}/{object}");
        let answer = self.call(
            "put object",
            &target,
            Method::Put,
            url,
            &[],
            &signed,
            &[],
            Some(bytes),
            ANSWER_MAX_BYTES,
        )?;
        if answer.status == 200 {
            Ok(())
        } else {
            Err(answer.error("put object", &target))
        }
    }

    fn get_object(&mut self, bucket: &str, object: &str) -> Result<Option<Vec<u8>>, PortError> {
        super::fs_storage::check_object_key("get object", object)?;
        let url = self.bucket("get object", bucket)?.object_url(object);
        let target = format!("{bucket}/{object}");
        let answer = self.call(
            "get object",
            &target,
            Method::Get,
            url,
            &[],
            &[],
            &[],
            None,
            OBJECT_MAX_BYTES,
        )?;
        match answer.status {
            200 => Ok(Some(answer.body)),
            404 if answer.error_code().as_deref() == Some("NoSuchKey") => Ok(None),
            _ => Err(answer.error("get object", &target)),
        }
    }

    fn list_objects(&mut self, bucket: &str) -> Result<Vec<String>, PortError> {
        let url = self.bucket("list objects", bucket)?.base_url().clone();
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        for _page in 0..10_000 {
            let mut query: Vec<(&str, &str)> = Vec::new();
            if let Some(token) = &token {
                query.push(("continuation-token", token.as_str()));
            }
            query.push(("list-type", "2"));
            let answer = self.call(
                "list objects",
                bucket,
                Method::Get,
                url.clone(),
                &query,
                &[],
                &[],
                None,
                ANSWER_MAX_BYTES,
            )?;
            if answer.status != 200 {
                return Err(answer.error("list objects", bucket));
            }
            let text = answer.text();
            for contents in raw_elements(&text, "Contents") {
                if let Some(key) = first_text(contents, "Key") {
                    keys.push(key);
                }
            }
            let truncated = first_text(&text, "IsTruncated").as_deref() == Some("true");
            token = first_text(&text, "NextContinuationToken");
            if !truncated || token.is_none() {
                break;
            }
        }
        keys.sort();
        Ok(keys)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The example of AWS's "Authenticating Requests: Using Query Parameters (AWS Signature
    /// Version 4)" page: GET test.txt from examplebucket, 2013-05-24, expires 86400.
    #[test]
    fn presigned_url_matches_the_aws_published_example() {
        let time = jiff::Timestamp::from_second(1_369_353_600).unwrap();
        let url: Url = "https://examplebucket.s3.amazonaws.com/test.txt"
            .parse()
            .unwrap();
        let signed = presign(
            &time,
            Method::Get,
            url,
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "us-east-1",
            86_400,
            &[],
            &[],
        );
        assert_eq!(
            signed.as_str(),
            "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
        );
    }

    /// Fixed vectors for what the AWS example above does not cover: a subresource (`?lifecycle`,
    /// `?tagging`) and a signed Content-MD5 header, as the adapter signs its bucket calls. The
    /// expected URLs are botocore's (1.43.11, installed with moto), from:
    ///
    /// ```python
    /// import base64, datetime, hashlib
    /// from unittest import mock
    /// import botocore.auth
    /// from botocore.auth import S3SigV4QueryAuth
    /// from botocore.awsrequest import AWSRequest
    /// from botocore.credentials import Credentials
    ///
    /// def presign(subresource, body):
    ///     md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
    ///     fixed = datetime.datetime(2013, 5, 24, 0, 0, 0)
    ///     with mock.patch.object(botocore.auth, "get_current_datetime", return_value=fixed):
    ///         auth = S3SigV4QueryAuth(Credentials("AKIAIOSFODNN7EXAMPLE",
    ///             "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"), "s3", "us-east-1", expires=300)
    ///         request = AWSRequest(method="PUT", url="http://127.0.0.1:9000/media/?" + subresource,
    ///             headers={"Content-MD5": md5})
    ///         auth.add_auth(request)
    ///     print(md5)
    ///     print(request.url)
    ///
    /// presign("lifecycle", b'<LifecycleConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Rule><ID>tmp</ID><Filter><Prefix>tmp/</Prefix></Filter><Status>Enabled</Status><Expiration><Days>7</Days></Expiration></Rule></LifecycleConfiguration>')
    /// presign("tagging", b'<Tagging><TagSet><Tag><Key>team</Key><Value>edge</Value></Tag></TagSet></Tagging>')
    /// ```
    ///
    /// botocore orders the query `subresource, X-Amz-…`; rusty-s3 sorts it, so the pairs are
    /// compared as sets and the signature exactly.
    #[test]
    fn bucket_subresource_requests_with_content_md5_match_botocore() {
        let storage = S3ObjectStorage::new(
            "http://127.0.0.1:9000",
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "us-east-1",
        )
        .unwrap();
        let time = jiff::Timestamp::from_second(1_369_353_600).unwrap();
        let lifecycle = merge_lifecycle_xml(
            "",
            &[LifecycleRule {
                id: "tmp".into(),
                prefix: "tmp/".into(),
                expire_days: 7,
            }],
        );
        let tagging = tags_xml(&BTreeMap::from([("team".into(), "edge".into())]));
        for (subresource, body, md5, botocore) in [
            (
                "lifecycle",
                lifecycle.as_bytes(),
                "zTqSPWNgm4Tcw1P35rBNXg==",
                "http://127.0.0.1:9000/media/?lifecycle=&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=300&X-Amz-SignedHeaders=content-md5%3Bhost&X-Amz-Signature=4e3304724140145f705a81dcd7ddc2d2ca1a189e8346c4f331c6989c25b1d029",
            ),
            (
                "tagging",
                tagging.as_bytes(),
                "53+jROfsxiRqGenajHPfWg==",
                "http://127.0.0.1:9000/media/?tagging=&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=300&X-Amz-SignedHeaders=content-md5%3Bhost&X-Amz-Signature=717565c49f08f525bb5d069b4fbb7ae356a8a27e3c03c27147c509b32516a97c",
            ),
        ] {
            let signed = storage
                .sign_bucket_request(&time, "test", "media", Method::Put, subresource, Some(body))
                .unwrap();
            assert_eq!(signed.content_md5.as_deref(), Some(md5), "{subresource}");
            let expected: Url = botocore.parse().unwrap();
            let pairs = |url: &Url| {
                let mut pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
                pairs.sort();
                pairs
            };
            assert_eq!(pairs(&signed.url), pairs(&expected), "{subresource}");
            assert_eq!(
                (
                    signed.url.scheme(),
                    signed.url.authority(),
                    signed.url.path()
                ),
                (expected.scheme(), expected.authority(), expected.path())
            );
            let signature = |url: &Url| {
                url.query_pairs()
                    .find(|(name, _)| name == "X-Amz-Signature")
                    .map(|(_, value)| value.into_owned())
            };
            assert_eq!(
                signature(&signed.url),
                signature(&expected),
                "{subresource}"
            );
        }
    }

    /// Merges lifecycle rule `tmp` (`tmp/`, 7 days), then tag `team=edge`, into `bucket`.
    fn merge_tmp_rule_and_team_tag(
        storage: &mut S3ObjectStorage,
        bucket: &str,
        key: &IdempotencyKey,
    ) {
        let rule = LifecycleRule {
            id: "tmp".into(),
            prefix: "tmp/".into(),
            expire_days: 7,
        };
        storage.merge_lifecycle_rules(bucket, &[rule], key).unwrap();
        let tags = BTreeMap::from([("team".into(), "edge".into())]);
        storage.merge_tags(bucket, &tags, key).unwrap();
    }

    /// One HTTP request as a capture listener received it.
    #[derive(Debug, Clone)]
    struct CapturedRequest {
        method: String,
        target: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl CapturedRequest {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(found, _)| found.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.as_str())
        }
    }

    /// A loopback listener that records every request and answers like S3 for a bucket with no
    /// lifecycle rules and no tags: GET `?lifecycle` 404 NoSuchLifecycleConfiguration, GET
    /// `?tagging` 404 NoSuchTagSet, anything else 200.
    fn capture_listener() -> (
        String,
        std::sync::Arc<std::sync::Mutex<Vec<CapturedRequest>>>,
    ) {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let captured = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = captured.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let record = record.clone();
                std::thread::spawn(move || -> std::io::Result<()> {
                    let mut reader = BufReader::new(stream.try_clone()?);
                    let mut stream = stream;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line)? == 0 {
                            return Ok(());
                        }
                        let mut parts = line.split_whitespace();
                        let method = parts.next().unwrap_or_default().to_string();
                        let target = parts.next().unwrap_or_default().to_string();
                        let mut headers = Vec::new();
                        loop {
                            let mut line = String::new();
                            reader.read_line(&mut line)?;
                            let line = line.trim_end();
                            if line.is_empty() {
                                break;
                            }
                            if let Some((name, value)) = line.split_once(':') {
                                headers.push((name.trim().to_string(), value.trim().to_string()));
                            }
                        }
                        let length: usize = headers
                            .iter()
                            .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
                            .and_then(|(_, value)| value.parse().ok())
                            .unwrap_or(0);
                        let mut body = vec![0; length];
                        reader.read_exact(&mut body)?;
                        let answer = match (method.as_str(), target.contains("?lifecycle")) {
                            ("GET", true) => (
                                404,
                                "<Error><Code>NoSuchLifecycleConfiguration</Code></Error>",
                            ),
                            ("GET", false) if target.contains("?tagging") => {
                                (404, "<Error><Code>NoSuchTagSet</Code></Error>")
                            }
                            _ => (200, ""),
                        };
                        record.lock().unwrap().push(CapturedRequest {
                            method,
                            target,
                            headers,
                            body,
                        });
                        write!(
                            stream,
                            "HTTP/1.1 {} X\r\nContent-Length: {}\r\n\r\n{}",
                            answer.0,
                            answer.1.len(),
                            answer.1
                        )?;
                    }
                });
            }
        });
        (endpoint, captured)
    }

    /// moto checks neither signatures nor MD5, so this listener shows what goes on the wire: the
    /// lifecycle and tagging PUTs carry a `content-md5` header that is the MD5 of the body sent,
    /// it is among the signed headers, and the signature is the one the adapter computes for
    /// that time, URL and header (the vectors above pin that computation to botocore's).
    #[test]
    fn content_md5_goes_on_the_wire_signed() {
        let (endpoint, captured) = capture_listener();
        let mut storage =
            S3ObjectStorage::new(&endpoint, "AKIAIOSFODNN7EXAMPLE", "secret", "us-east-1").unwrap();
        let key = IdempotencyKey("wire-key".into());
        merge_tmp_rule_and_team_tag(&mut storage, "media", &key);
        let requests = captured.lock().unwrap().clone();
        let puts: Vec<&CapturedRequest> = requests
            .iter()
            .filter(|request| request.method == "PUT")
            .collect();
        assert_eq!(puts.len(), 2, "{requests:#?}");
        for (put, subresource) in puts.iter().zip(["lifecycle", "tagging"]) {
            let url: Url = format!("{endpoint}{}", put.target).parse().unwrap();
            assert!(
                url.query_pairs().any(|(name, _)| name == subresource),
                "{put:?}"
            );
            let sent_md5 = put.header("content-md5").expect("a content-md5 header");
            assert_eq!(sent_md5, content_md5(&put.body), "the MD5 of the body sent");
            assert_eq!(put.header(IDEMPOTENCY_HEADER), Some("wire-key"));
            let query = |name: &str| {
                url.query_pairs()
                    .find(|(found, _)| found == name)
                    .map(|(_, value)| value.into_owned())
                    .unwrap_or_default()
            };
            assert_eq!(query("X-Amz-SignedHeaders"), "content-md5;host");
            let date = query("X-Amz-Date");
            let time: jiff::Timestamp = format!(
                "{}-{}-{}T{}:{}:{}Z",
                &date[0..4],
                &date[4..6],
                &date[6..8],
                &date[9..11],
                &date[11..13],
                &date[13..15]
            )
            .parse()
            .unwrap();
            let expected = storage
                .sign_bucket_request(
                    &time,
                    "test",
                    "media",
                    Method::Put,
                    subresource,
                    Some(&put.body),
                )
                .unwrap();
            assert_eq!(expected.content_md5.as_deref(), Some(sent_md5));
            let signature = expected
                .url
                .query_pairs()
                .find(|(name, _)| name == "X-Amz-Signature")
                .map(|(_, value)| value.into_owned());
            assert_eq!(Some(query("X-Amz-Signature")), signature, "{put:?}");
        }
    }

    /// Content-MD5 is base64 of the MD5 digest (RFC 1864) — RFC 1321 test-suite digests.
    #[test]
    fn content_md5_follows_rfc_1864() {
        assert_eq!(
            content_md5(b""),
            "1B2M2Y8AsgTpgAmY7PhCfg==",
            "md5 d41d8cd98f00b204e9800998ecf8427e"
        );
        assert_eq!(
            content_md5(b"abc"),
            "kAFQmDzST7DWlj99KOF/cg==",
            "md5 900150983cd24fb0d6963f7d28e17f72"
        );
        assert_eq!(
            content_md5(b"message digest"),
            "+WtpfXy3k41SWi8xqvFh0A==",
            "md5 f96b697d7cb7938d525a2f31aaf161d0"
        );
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn create_bucket_answers_are_classified_by_status_and_code() {
        assert_eq!(
            classify_create_bucket(200, None),
            CreateBucketAnswer::Created
        );
        assert_eq!(
            classify_create_bucket(409, Some("BucketAlreadyOwnedByYou")),
            CreateBucketAnswer::AlreadyOwned
        );
        assert_eq!(
            classify_create_bucket(409, Some("BucketAlreadyExists")),
            CreateBucketAnswer::TakenByAnotherAccount
        );
        assert_eq!(
            classify_create_bucket(409, Some("OperationAborted")),
            CreateBucketAnswer::Failed
        );
        assert_eq!(
            classify_create_bucket(409, None),
            CreateBucketAnswer::Failed
        );
        assert_eq!(
            classify_create_bucket(403, Some("AccessDenied")),
            CreateBucketAnswer::Failed
        );
    }

    #[test]
    fn lifecycle_merge_keeps_foreign_rules_verbatim() {
        let existing = format!(
            "<LifecycleConfiguration xmlns=\"{S3_NS}\"><Rule><ID>theirs</ID><Filter><And><Prefix>a/</Prefix><Tag><Key>k</Key><Value>v</Value></Tag></And></Filter><Status>Enabled</Status><Transition><Days>30</Days><StorageClass>GLACIER</StorageClass></Transition></Rule><Rule><ID>tmp</ID><Filter><Prefix>tmp/</Prefix></Filter><Status>Enabled</Status><Expiration><Days>7</Days></Expiration></Rule></LifecycleConfiguration>"
        );
        let merged = merge_lifecycle_xml(
            &existing,
            &[LifecycleRule {
                id: "tmp".into(),
                prefix: "tmp/".into(),
                expire_days: 14,
            }],
        );
        assert!(
            merged.contains("<Rule><ID>theirs</ID><Filter><And>"),
            "{merged}"
        );
        assert_eq!(merged.matches("<ID>tmp</ID>").count(), 1);
        let rules = parse_lifecycle(&merged);
        assert_eq!(
            rules[0],
            ObservedLifecycleRule {
                id: "theirs".into(),
                prefix: None,
                expire_days: None
            }
        );
        assert_eq!(
            rules[1],
            ObservedLifecycleRule {
                id: "tmp".into(),
                prefix: Some("tmp/".into()),
                expire_days: Some(14)
            }
        );
    }

    #[test]
    fn tags_round_trip_with_escaping() {
        let tags = BTreeMap::from([("team".to_string(), "core & <ops>".to_string())]);
        assert_eq!(parse_tags(&tags_xml(&tags)), tags);
    }

    /// A moto S3 server on a free loopback port, killed on drop. moto stands in for MinIO (no
    /// MinIO can be installed here); it checks neither signatures nor Content-MD5, which the
    /// tests above cover: AWS's published example, botocore's signatures for subresource +
    /// Content-MD5 requests, and a capture listener for what goes on the wire.
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
                .port();
            let port_text = port.to_string();
            let quiet = |command: &mut std::process::Command| {
                command
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
            };
            // `moto_server` is the console script; `python3 -m moto.server` works where the
            // script is not on PATH (e.g. a pyenv without rehash).
            let child = quiet(std::process::Command::new("moto_server").args(["-H", "127.0.0.1", "-p", &port_text]))
                .or_else(|_| {
                    quiet(std::process::Command::new("python3").args([
                        "-m",
                        "moto.server",
                        "-H",
                        "127.0.0.1",
                        "-p",
                        &port_text,
                    ]))
                })
                .unwrap_or_else(|error| {
                    panic!("cannot start moto_server ({error}); install it with: python3 -m pip install 'moto[server]'")
                });
            let mut server = MotoServer {
                child,
                endpoint: format!("http://127.0.0.1:{port}"),
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    break;
                }
                if let Ok(Some(status)) = server.child.try_wait() {
                    panic!(
                        "moto server exited with {status} before listening; install it with: python3 -m pip install 'moto[server]'"
                    );
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "moto_server did not listen on {port} within 60 s"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            server
        }

        pub fn storage(&self) -> S3ObjectStorage {
            S3ObjectStorage::new(
                &self.endpoint,
                "testing-access",
                "testing-secret",
                "us-east-1",
            )
            .unwrap()
        }
    }

    impl Drop for MotoServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[test]
    fn s3_meets_the_object_storage_contract() {
        let moto = MotoServer::start();
        super::super::contract_tests::object_storage_contract(&mut moto.storage());
    }

    #[test]
    fn foreign_rules_and_tags_survive_a_merge_on_s3() {
        let moto = MotoServer::start();
        let mut storage = moto.storage();
        let key = IdempotencyKey("k".into());
        storage.create_bucket("shared", &key).unwrap();
        let theirs = format!(
            "<LifecycleConfiguration xmlns=\"{S3_NS}\"><Rule><ID>theirs</ID><Filter><Prefix>archive/</Prefix></Filter><Status>Enabled</Status><Expiration><Days>365</Days></Expiration></Rule></LifecycleConfiguration>"
        );
        let answer = storage
            .bucket_call(
                "test",
                "shared",
                Method::Put,
                "lifecycle",
                Some(theirs.as_bytes()),
                None,
            )
            .unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
        storage
            .merge_tags(
                "shared",
                &BTreeMap::from([("owner".into(), "finance".into())]),
                &key,
            )
            .unwrap();

        merge_tmp_rule_and_team_tag(&mut storage, "shared", &key);
        let state = storage.read_bucket("shared").unwrap().unwrap();
        let ids: Vec<&str> = state
            .lifecycle
            .iter()
            .map(|rule| rule.id.as_str())
            .collect();
        assert_eq!(ids, ["theirs", "tmp"]);
        assert_eq!(state.tags.get("owner").map(String::as_str), Some("finance"));
        assert_eq!(state.tags.get("team").map(String::as_str), Some("edge"));
    }

    /// The three answers an existing bucket can get, over the wire from moto (which follows
    /// S3 here, see moto/s3/responses.py `_bucket_response_put`): the owner gets 200 in
    /// `us-east-1` and 409 `BucketAlreadyOwnedByYou` elsewhere, both success; another account
    /// gets 409 `BucketAlreadyExists`, an error naming the bucket.
    #[test]
    fn existing_buckets_are_ours_or_an_error_naming_the_bucket_on_s3() {
        let moto = MotoServer::start();
        let key = IdempotencyKey("k".into());
        let raw_create = |storage: &S3ObjectStorage, bucket: &str, headers: &[(&str, &str)]| {
            let url = storage.bucket("test", bucket).unwrap().base_url().clone();
            let body = (storage.region != "us-east-1").then(|| {
                format!(
                    "<CreateBucketConfiguration xmlns=\"{S3_NS}\"><LocationConstraint>{}</LocationConstraint></CreateBucketConfiguration>",
                    storage.region
                )
            });
            let answer = storage
                .call(
                    "test",
                    bucket,
                    Method::Put,
                    url,
                    &[],
                    &[],
                    headers,
                    body.as_deref().map(str::as_bytes),
                    4096,
                )
                .unwrap();
            (answer.status, answer.error_code())
        };

        let mut east = moto.storage();
        let ours = super::super::contract_tests::unique("ours");
        east.create_bucket(&ours, &key).unwrap();
        assert_eq!(
            raw_create(&east, &ours, &[]),
            (200, None),
            "us-east-1 answers 200 to the owner"
        );
        east.create_bucket(&ours, &key).unwrap();

        let mut west = S3ObjectStorage::new(
            &moto.endpoint,
            "testing-access",
            "testing-secret",
            "eu-west-1",
        )
        .unwrap();
        let ours_west = super::super::contract_tests::unique("ours-west");
        west.create_bucket(&ours_west, &key).unwrap();
        assert_eq!(
            raw_create(&west, &ours_west, &[]),
            (409, Some("BucketAlreadyOwnedByYou".into()))
        );
        west.create_bucket(&ours_west, &key).unwrap();

        // moto reads the account from `x-moto-account-id`; ours is its default, 123456789012.
        let taken = super::super::contract_tests::unique("taken");
        assert_eq!(
            raw_create(&east, &taken, &[("x-moto-account-id", "111122223333")]),
            (200, None)
        );
        assert_eq!(
            raw_create(&east, &taken, &[]),
            (409, Some("BucketAlreadyExists".into()))
        );
        let error = east.create_bucket(&taken, &key).unwrap_err();
        assert!(matches!(error, PortError::Refused { .. }), "{error}");
        let text = error.to_string();
        assert!(
            text.contains(&format!("{taken:?}")) && text.contains("BucketAlreadyExists"),
            "{text}"
        );
    }

    /// Seed cases with S3 as the store: created once then no-ops; a bucket deleted by hand comes
    /// back; objects of the default store fall forward once.
    #[test]
    fn engine_against_s3_creates_once_repairs_and_falls_forward() {
        use super::super::engine::{Outcome, UnchangedPolicy};
        use super::super::engine_tests::{Harness, seed_profile};
        let moto = MotoServer::start();
        let mut harness = Harness::new();
        let profile = seed_profile();
        // Cold start on the default store, with an object in it.
        harness.run(&profile, UnchangedPolicy::VerifyActual);
        let key = IdempotencyKey("k".into());
        let mut local = super::super::FsObjectStorage::new(harness.dir.path().join("storage"));
        local
            .put_object("media", "photos/1.jpg", b"jpeg bytes", &key)
            .unwrap();

        // The agent restarts with MINIO_ENDPOINT set.
        harness.adapters.storage = Box::new(moto.storage());
        harness.adapters.fall_forward_from = Some(local.clone());
        let first = harness.run(&profile, UnchangedPolicy::Skip);
        let storage = &first.components[0];
        assert_eq!(storage.outcome, Outcome::Applied, "{storage:#?}");
        assert_eq!(storage.steps_applied.len(), 4, "{storage:#?}");
        assert_eq!(storage.objects_copied, 1);
        let mut s3 = moto.storage();
        assert_eq!(
            s3.get_object("media", "photos/1.jpg").unwrap().as_deref(),
            Some(&b"jpeg bytes"[..])
        );
        let state = s3.read_bucket("media").unwrap().unwrap();
        assert_eq!(state.versioning, VersioningState::Enabled);

        let second = harness.run(&profile, UnchangedPolicy::VerifyActual);
        assert_eq!(
            second.components[0].outcome,
            Outcome::Unchanged,
            "{:#?}",
            second.components[0]
        );

        // Deleted by hand (objects first, then the bucket).
        let object_url = s3
            .bucket("test", "media")
            .unwrap()
            .object_url("photos/1.jpg");
        let answer = s3
            .call(
                "test",
                "media",
                Method::Delete,
                object_url,
                &[],
                &[],
                &[],
                None,
                1024,
            )
            .unwrap();
        assert!(matches!(answer.status, 200 | 204), "{}", answer.text());
        let versions = s3
            .bucket_call("test", "media", Method::Get, "versions", None, None)
            .unwrap()
            .text();
        for version in raw_elements(&versions, "Version")
            .into_iter()
            .chain(raw_elements(&versions, "DeleteMarker"))
        {
            let object = first_text(version, "Key").unwrap();
            let id = first_text(version, "VersionId").unwrap();
            let url = s3.bucket("test", "media").unwrap().object_url(&object);
            s3.call(
                "test",
                "media",
                Method::Delete,
                url,
                &[("versionId", &id)],
                &[],
                &[],
                None,
                1024,
            )
            .unwrap();
        }
        let answer = s3
            .bucket_call("test", "media", Method::Delete, "", None, None)
            .unwrap();
        assert_eq!(answer.status, 204, "{}", answer.text());
        assert_eq!(s3.read_bucket("media").unwrap(), None);

        let repaired = harness.run(&profile, UnchangedPolicy::VerifyActual);
        assert_eq!(repaired.components[0].outcome, Outcome::Applied);
        assert!(s3.read_bucket("media").unwrap().is_some());
        assert_eq!(
            repaired.components[0].objects_copied, 0,
            "the marker says it was copied already"
        );
    }
}
