//! Object-store locations: `s3://`, `gs://`, `http(s)://` (and `file://`, which is local).
//!
//! A [`RemoteStore`] is a zarrs store over one location (a bucket or host, and a key prefix),
//! built on `object_store` clients that a process shares per bucket or host. What it adds:
//! - **Requests in flight**: [`RemoteStore::prefetch`] starts the requests for keys a batch
//!   will read, all at once (bounded process-wide by [`RemoteOptions::max_in_flight`]); the
//!   decode threads then find the bytes arrived or arriving, so latency is paid once per
//!   batch rather than once per chunk.
//! - **Faults**: retries with exponential backoff for 5xx answers, resets and timeouts (the
//!   client's retry policy), a timeout per request, and errors that name the URL and the HTTP
//!   status; 403 and 404 are answered at once.
//! - **Byte ranges together**: the ranges of one object a read asks for (inner chunks of a
//!   shard) go out as few requests: object_store's `coalesce_ranges` merges ranges less than
//!   [`RemoteOptions::range_gap`] apart (1 MiB by default) into one request and runs the
//!   requests concurrently; [`RemoteStore::prefetch_ranges`]
//!   starts them ahead of the reads like [`RemoteStore::prefetch`].
//! - **An optional disk cache** of fetched values and ranges ([`DiskCache`]).
//!
//! Options come from the environment ([`RemoteOptions::from_env`]) or from
//! [`set_options`]; credentials and region come from the standard variables of each service
//! (`AWS_*`, `GOOGLE_*`), and a store without credentials is read anonymously.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use object_store::path::Path as ObjectPath;
use object_store::{coalesce_ranges, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload};
use tokio::runtime::Runtime;
use tokio::sync::Semaphore;
use zarrs::storage::byte_range::{ByteRange, ByteRangeIterator};
use zarrs::storage::{
    store_set_partial_many, Bytes, ListableStorageTraits, MaybeBytes, MaybeBytesIterator, OffsetBytesIterator, ReadableStorageTraits,
    StorageError, StoreKey, StoreKeys, StoreKeysPrefixes, StorePrefix, WritableStorageTraits,
};

use crate::error::{Error, Result};

use super::disk_cache::DiskCache;
use super::location::{is_remote, local_path, scheme_of};
pub use super::remote_options::{RemoteOptions, RemoteOptionsUpdate, DEFAULT_DISK_CACHE_BYTES};

/// The process's remote machinery: options, the async runtime, the request limit and the
/// clients per bucket or host. Rebuilt after a fork (the parent's runtime threads are gone).
struct RemoteState {
    pid: u32,
    options: RemoteOptions,
    runtime: Arc<Runtime>,
    in_flight: Arc<Semaphore>,
    clients: Mutex<HashMap<String, Arc<dyn ObjectStore>>>,
    disk: Option<Arc<DiskCache>>,
}

static STATE: Mutex<Option<Arc<RemoteState>>> = Mutex::new(None);
static OPTIONS: Mutex<Option<RemoteOptions>> = Mutex::new(None);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Replaces the process's remote options; stores opened afterwards use them.
pub fn set_options(options: RemoteOptions) {
    *lock(&OPTIONS) = Some(options);
    // Stores already open keep the old state alive through their Arc.
    lock(&STATE).take();
}

/// Applies `update` to the options in effect (checked as a whole, before anything changes).
pub fn update_options(update: &RemoteOptionsUpdate) -> Result<RemoteOptions> {
    let updated = options()?.updated(update, |field| field.to_string())?;
    set_options(updated.clone());
    Ok(updated)
}

/// The options in effect: those set, else the environment's (an unusable value there is an
/// error naming its variable).
pub fn options() -> Result<RemoteOptions> {
    match lock(&OPTIONS).clone() {
        Some(options) => Ok(options),
        None => RemoteOptions::from_env(),
    }
}

fn state() -> Result<Arc<RemoteState>> {
    let pid = std::process::id();
    let mut guard = lock(&STATE);
    if let Some(s) = guard.as_ref() {
        if s.pid == pid {
            return Ok(s.clone());
        }
        // A forked child: never touch the parent's runtime (its threads do not exist here).
        std::mem::forget(guard.take());
    }
    let options = options()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("cellmap-remote")
        .enable_all()
        .build()
        .map_err(|e| Error::invalid(format!("could not start the remote I/O runtime: {e}")))?;
    let disk = match &options.disk_cache {
        Some((dir, budget)) => Some(Arc::new(DiskCache::open(dir, *budget)?)),
        None => None,
    };
    let s = Arc::new(RemoteState {
        pid,
        in_flight: Arc::new(Semaphore::new(options.max_in_flight.max(1))),
        options,
        runtime: Arc::new(runtime),
        clients: Mutex::new(HashMap::new()),
        disk,
    });
    *guard = Some(s.clone());
    Ok(s)
}

/// A location split into the client's root (`s3://bucket`, `http://host:port`) and the key
/// prefix below it.
fn split_url(url: &str) -> Result<(String, String, String)> {
    let bad = |why: &str| Error::invalid(format!("{url}: {why}"));
    let scheme = scheme_of(url).ok_or_else(|| bad("not a URL this engine reads (s3://, gs://, http://, https://)"))?;
    let rest = &url[scheme.len() + 3..];
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if authority.is_empty() {
        return Err(bad("no bucket or host"));
    }
    let path = path.trim_matches('/');
    if path.split('/').any(|part| part == "." || part == "..") {
        return Err(bad("'.' and '..' are not allowed in a URL path"));
    }
    Ok((scheme.to_string(), authority.to_string(), path.to_string()))
}

fn client_options(options: &RemoteOptions) -> object_store::ClientOptions {
    object_store::ClientOptions::new()
        .with_timeout(options.timeout)
        .with_connect_timeout(options.timeout.min(Duration::from_secs(10)))
        .with_allow_http(true)
        .with_pool_max_idle_per_host(options.max_in_flight.max(8))
}

fn retry_config(options: &RemoteOptions) -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: options.max_retries,
        // Bounded: a stalled server turns into an error, never a hang.
        retry_timeout: options.timeout * (options.max_retries as u32 + 1),
    }
}

/// Reads one value (or a range of it) whole. The client retries a request that fails before
/// its answer (5xx, resets, timeouts); a body that breaks off after the answer began — the
/// connection closes mid-body, or fewer bytes arrive than the answer announced — is requested
/// again here with the same backoff and number of retries, and a short body is never returned
/// (so never decoded).
async fn get_whole(
    client: &dyn ObjectStore,
    path: &ObjectPath,
    options: GetOptions,
    retry: &object_store::RetryConfig,
) -> object_store::Result<Bytes> {
    let mut backoff = retry.backoff.init_backoff;
    let mut attempt = 0;
    loop {
        let answer = client.get_opts(path, options.clone()).await?;
        let expected = answer.range.end - answer.range.start;
        let failure = match answer.bytes().await {
            Ok(bytes) if bytes.len() as u64 == expected => return Ok(bytes),
            Ok(bytes) => object_store::Error::Generic {
                store: "HTTP",
                source: format!("the body ended after {} of {expected} bytes", bytes.len()).into(),
            },
            Err(e) => e,
        };
        if attempt >= retry.max_retries {
            return Err(failure);
        }
        attempt += 1;
        tokio::time::sleep(backoff).await;
        backoff = backoff.mul_f64(retry.backoff.base).min(retry.backoff.max_backoff);
    }
}

/// The AWS profile's keys and region from the shared files (`~/.aws/credentials`,
/// `~/.aws/config`, or `AWS_SHARED_CREDENTIALS_FILE` / `AWS_CONFIG_FILE`), for the profile
/// `AWS_PROFILE` (default `default`). object_store itself reads only the environment.
#[derive(Debug, Default, PartialEq)]
struct AwsProfile {
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    session_token: Option<String>,
    region: Option<String>,
}

fn aws_profile() -> AwsProfile {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let file = |var: &str, name: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws").join(name)))
    };
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".to_string());
    let mut out = AwsProfile::default();
    if let Some(ini) = file("AWS_SHARED_CREDENTIALS_FILE", "credentials").and_then(|f| ini::Ini::load_from_file(f).ok()) {
        if let Some(section) = ini.section(Some(profile.as_str())) {
            out.access_key_id = section.get("aws_access_key_id").map(str::to_string);
            out.secret_access_key = section.get("aws_secret_access_key").map(str::to_string);
            out.session_token = section.get("aws_session_token").map(str::to_string);
        }
    }
    if let Some(ini) = file("AWS_CONFIG_FILE", "config").and_then(|f| ini::Ini::load_from_file(f).ok()) {
        // In the config file, profiles other than the default are named `profile <name>`.
        let name = if profile == "default" {
            profile.clone()
        } else {
            format!("profile {profile}")
        };
        out.region = ini.section(Some(name.as_str())).and_then(|s| s.get("region")).map(str::to_string);
    }
    out
}

/// Whether AWS credentials are configured (variables, a web identity, a container role, or a
/// profile with keys): then requests are signed, else a public bucket is read anonymously.
fn aws_credentials_configured(profile: &AwsProfile) -> bool {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    set("AWS_ACCESS_KEY_ID")
        || set("AWS_WEB_IDENTITY_TOKEN_FILE")
        || set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        || profile.access_key_id.is_some()
}

fn build_client(scheme: &str, authority: &str, options: &RemoteOptions) -> Result<Arc<dyn ObjectStore>> {
    let failed = |e: object_store::Error| Error::invalid(format!("{scheme}://{authority}: cannot open the store: {e}"));
    Ok(match scheme {
        "s3" => {
            let profile = aws_profile();
            let mut builder = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(authority)
                .with_client_options(client_options(options))
                .with_retry(retry_config(options));
            // The environment wins over the shared files, as in the AWS tools.
            if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none() {
                builder = builder.with_region(profile.region.clone().unwrap_or_else(|| "us-east-1".to_string()));
            }
            if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
                if let (Some(key), Some(secret)) = (&profile.access_key_id, &profile.secret_access_key) {
                    builder = builder.with_access_key_id(key).with_secret_access_key(secret);
                    if let Some(token) = &profile.session_token {
                        builder = builder.with_token(token);
                    }
                }
            }
            if let Some(endpoint) = &options.endpoint {
                builder = builder.with_endpoint(endpoint.clone()).with_virtual_hosted_style_request(false);
            }
            let anonymous = options.anonymous.unwrap_or_else(|| !aws_credentials_configured(&profile));
            if anonymous {
                builder = builder.with_skip_signature(true);
            }
            Arc::new(builder.build().map_err(failed)?)
        }
        "gs" => {
            let configured = [
                "GOOGLE_SERVICE_ACCOUNT",
                "GOOGLE_SERVICE_ACCOUNT_PATH",
                "GOOGLE_APPLICATION_CREDENTIALS",
                "GOOGLE_SERVICE_ACCOUNT_KEY",
            ]
            .iter()
            .any(|v| std::env::var_os(v).is_some());
            let anonymous = options.anonymous.unwrap_or(!configured);
            Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(authority)
                    .with_client_options(client_options(options))
                    .with_retry(retry_config(options))
                    .with_skip_signature(anonymous)
                    .build()
                    .map_err(failed)?,
            )
        }
        "http" | "https" => Arc::new(
            object_store::http::HttpBuilder::new()
                .with_url(format!("{scheme}://{authority}"))
                .with_client_options(client_options(options))
                .with_retry(retry_config(options))
                .build()
                .map_err(failed)?,
        ),
        other => return Err(Error::invalid(format!("{other}:// is not an object store"))),
    })
}

fn is_metadata_name(key: &str) -> bool {
    matches!(key.rsplit('/').next(), Some("zarr.json" | ".zarray" | ".zattrs" | ".zgroup"))
}

type Fetched = std::result::Result<MaybeBytes, Arc<Error>>;

/// The name a byte range of `key` is prefetched and disk-cached under.
fn range_key(key: &str, range: &Range<u64>) -> String {
    open_range_key(key, &GetRange::Bounded(range.clone()))
}

/// [`range_key`] for any range, open or suffix ones included.
fn open_range_key(key: &str, range: &GetRange) -> String {
    match range {
        GetRange::Bounded(r) => format!("{key}#bytes={}-{}", r.start, r.end),
        GetRange::Offset(offset) => format!("{key}#bytes={offset}-"),
        GetRange::Suffix(length) => format!("{key}#bytes=-{length}"),
    }
}

/// A range with both ends known (the form inner chunks of a shard are asked for in).
fn bounded(range: &ByteRange) -> Option<Range<u64>> {
    match *range {
        ByteRange::FromStart(offset, Some(length)) if length > 0 => Some(offset..offset + length),
        _ => None,
    }
}

/// Requests started ahead of their reads, by key; the oldest are forgotten past a bound (a
/// planned chunk that was never read must not hold its bytes forever).
#[derive(Default)]
struct Prefetched {
    futures: HashMap<String, Shared<BoxFuture<'static, Fetched>>>,
    order: VecDeque<String>,
}

/// What one request needs, owned by the task that runs it.
#[derive(Clone)]
struct Request {
    client: Arc<dyn ObjectStore>,
    path: ObjectPath,
    url: String,
    limit: Arc<Semaphore>,
    disk: Option<Arc<DiskCache>>,
    retry: object_store::RetryConfig,
}

impl Request {
    /// One GET (of a range, with `options`) within the process's request limit, retried as
    /// [`get_whole`] retries.
    async fn get(&self, options: GetOptions) -> object_store::Result<Bytes> {
        let _permit = self.limit.clone().acquire_owned().await.map_err(|e| object_store::Error::Generic {
            store: "HTTP",
            source: Box::new(e),
        })?;
        get_whole(self.client.as_ref(), &self.path, options, &self.retry).await
    }
}

/// A zarrs store over one remote location.
pub struct RemoteStore {
    /// The location's URL (no trailing slash), for messages.
    url: String,
    /// The key prefix below the client's root.
    prefix: String,
    client: Arc<dyn ObjectStore>,
    state: Arc<RemoteState>,
    prefetched: Mutex<Prefetched>,
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStore").field("url", &self.url).finish()
    }
}

/// The HTTP status in an object_store error, if it carries one. The client's error types are
/// private, so the status is read from their text ("...status code: 503 Service...").
fn http_status(error: &(dyn std::error::Error + 'static)) -> Option<u16> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        let text = e.to_string();
        if let Some(at) = text.find("status code: ") {
            let digits: String = text[at + 13..].chars().take_while(char::is_ascii_digit).collect();
            if let Ok(status) = digits.parse() {
                return Some(status);
            }
        }
        current = e.source();
    }
    None
}

/// An object_store error as the engine's, naming `url`: 404 → not found, 401/403 →
/// permission denied, anything else (5xx after retries, resets, timeouts) → an I/O error.
fn remote_error(url: &str, error: object_store::Error) -> Error {
    use std::io::ErrorKind;
    let status = http_status(&error);
    let detail = match status {
        Some(s) => format!("HTTP {s}: {error}"),
        None => error.to_string(),
    };
    let kind = match (&error, status) {
        (object_store::Error::NotFound { .. }, _) | (_, Some(404)) => return Error::not_found_because(url, detail),
        (object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }, _) | (_, Some(401 | 403)) => {
            ErrorKind::PermissionDenied
        }
        _ if detail.contains("timed out") || detail.contains("timeout") => ErrorKind::TimedOut,
        _ => ErrorKind::Other,
    };
    Error::io(url, std::io::Error::new(kind, detail))
}

/// A request's result with "not found" as `None`; other errors name `url`.
fn absent_as_none<T>(url: &str, result: object_store::Result<T>) -> Result<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e) => match remote_error(url, e) {
            Error::NotFound { .. } => Ok(None),
            other => Err(other),
        },
    }
}

fn storage_error(error: &Error) -> StorageError {
    match error {
        Error::Io { source, .. } => StorageError::IOError(Arc::new(std::io::Error::new(source.kind(), error.to_string()))),
        other => StorageError::Other(other.to_string()),
    }
}

impl RemoteStore {
    /// Opens the location `url` (`s3://bucket/prefix`, `gs://…`, `http(s)://host/prefix`).
    /// Nothing is requested until a key is read.
    pub fn open(url: &str) -> Result<Arc<RemoteStore>> {
        let (scheme, authority, prefix) = split_url(url)?;
        let state = state()?;
        let root = format!("{scheme}://{authority}");
        let client = {
            let mut clients = lock(&state.clients);
            match clients.get(&root) {
                Some(c) => c.clone(),
                None => {
                    // The clients' connection pools live on this runtime.
                    let _guard = state.runtime.enter();
                    let c = build_client(&scheme, &authority, &state.options)?;
                    clients.insert(root.clone(), c.clone());
                    c
                }
            }
        };
        let url = if prefix.is_empty() { root } else { format!("{root}/{prefix}") };
        Ok(Arc::new(RemoteStore {
            url,
            prefix,
            client,
            state,
            prefetched: Mutex::new(Prefetched::default()),
        }))
    }

    /// The location's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL of `key` (for messages).
    pub fn key_url(&self, key: &str) -> String {
        format!("{}/{}", self.url, key.trim_start_matches('/'))
    }

    fn object_path(&self, key: &str) -> ObjectPath {
        let key = key.trim_start_matches('/');
        if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{}", self.prefix, key))
        }
    }

    fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.state.runtime.block_on(future)
    }

    /// Reads the value at `key`: `None` when absent.
    pub fn read(&self, key: &str) -> Result<Option<Bytes>> {
        let started = lock(&self.prefetched).futures.remove(key);
        if let Some(shared) = started {
            return self.block_on(shared).map_err(|e| (*e).clone_error());
        }
        self.block_on(self.fetch_future(key.to_string()))
    }

    /// What a request for `key` needs, owned (requests run as tasks of their own).
    fn request(&self, key: &str) -> Request {
        Request {
            client: self.client.clone(),
            path: self.object_path(key),
            url: self.key_url(key),
            limit: self.state.in_flight.clone(),
            disk: self.state.disk.clone(),
            retry: retry_config(&self.state.options),
        }
    }

    /// A request for `key` through the disk cache, within the process's request limit.
    fn fetch_future(&self, key: String) -> impl Future<Output = Result<Option<Bytes>>> + Send + 'static {
        let request = self.request(&key);
        async move {
            let disk = request.disk.clone();
            if let Some(bytes) = disk.as_ref().and_then(|d| d.get(&request.url)) {
                return Ok(Some(bytes));
            }
            let fetched = absent_as_none(&request.url, request.get(GetOptions::default()).await)?;
            if let (Some(d), Some(bytes)) = (&disk, &fetched) {
                d.put(&request.url, bytes);
            }
            Ok(fetched)
        }
    }

    /// Starts the requests for `keys` (those not already started) without waiting; later
    /// reads of those keys wait for them instead of asking again.
    pub fn prefetch(&self, keys: impl IntoIterator<Item = String>) {
        let mut started = lock(&self.prefetched);
        for key in keys {
            if started.futures.contains_key(&key) {
                continue;
            }
            let handle = self.state.runtime.spawn(self.fetch_future(key.clone()));
            let url = self.key_url(&key);
            let future: BoxFuture<'static, Fetched> = async move {
                match handle.await {
                    Ok(result) => result.map_err(Arc::new),
                    Err(e) => Err(Arc::new(Error::Internal(format!("{url}: request task failed: {e}")))),
                }
            }
            .boxed();
            started.futures.insert(key.clone(), future.shared());
            started.order.push_back(key);
        }
        Self::forget_oldest(&mut started, self.state.options.max_in_flight);
    }

    /// Forgets the oldest requests started ahead past a bound: enough for several batches
    /// ahead even when few requests may be in flight at once.
    fn forget_oldest(started: &mut Prefetched, max_in_flight: usize) {
        let bound = (8 * max_in_flight).max(4096);
        while started.order.len() > bound {
            if let Some(old) = started.order.pop_front() {
                started.futures.remove(&old);
            }
        }
        // Keys already read were removed from `futures`; keep `order` from growing with them.
        if started.order.len() > 2 * started.futures.len() + 64 {
            let Prefetched { futures, order } = started;
            order.retain(|k| futures.contains_key(k));
        }
    }

    /// The byte `ranges` of `key`, in order, through the disk cache: ranges less than
    /// [`RemoteOptions::range_gap`] apart go out as one request (object_store's coalescing; a
    /// gap of 0 asks for each on its own), each request within the process's request limit and
    /// retried like a whole read. `None` when the key is absent.
    fn ranges_future(&self, key: String, ranges: Vec<Range<u64>>) -> impl Future<Output = Result<Option<Vec<Bytes>>>> + Send + 'static {
        let request = self.request(&key);
        let gap = self.state.options.range_gap;
        async move {
            let (url, disk) = (request.url.clone(), request.disk.clone());
            let cached: Option<Vec<Bytes>> = disk
                .as_ref()
                .and_then(|d| ranges.iter().map(|r| d.get(&range_key(&url, r))).collect());
            if let Some(parts) = cached {
                return Ok(Some(parts));
            }
            let fetch = |range: Range<u64>| {
                let request = request.clone();
                async move { request.get(GetOptions::new().with_range(Some(GetRange::Bounded(range)))).await }
            };
            let fetched = if gap == 0 {
                futures::future::try_join_all(ranges.iter().cloned().map(fetch)).await
            } else {
                coalesce_ranges(&ranges, fetch, gap).await
            };
            let fetched = absent_as_none(&url, fetched)?;
            if let (Some(d), Some(parts)) = (&disk, &fetched) {
                for (range, bytes) in ranges.iter().zip(parts) {
                    d.put(&range_key(&url, range), bytes.as_ref());
                }
            }
            Ok(fetched)
        }
    }

    /// Starts the requests for byte `ranges` of `key` (those not already started) without
    /// waiting, coalesced as [`RemoteStore::ranges_future`] does; a later partial read of one of
    /// those ranges waits for it instead of asking again.
    pub fn prefetch_ranges(&self, key: &str, ranges: Vec<Range<u64>>) {
        let mut started = lock(&self.prefetched);
        let mut ranges: Vec<Range<u64>> = ranges
            .into_iter()
            .filter(|r| r.end > r.start && !started.futures.contains_key(&range_key(key, r)))
            .collect();
        ranges.sort_by_key(|r| (r.start, r.end));
        ranges.dedup();
        if ranges.is_empty() {
            return;
        }
        let handle = self.state.runtime.spawn(self.ranges_future(key.to_string(), ranges.clone()));
        let url = self.key_url(key);
        type Group = std::result::Result<Option<Arc<Vec<Bytes>>>, Arc<Error>>;
        let group: Shared<BoxFuture<'static, Group>> = async move {
            match handle.await {
                Ok(result) => result.map(|parts| parts.map(Arc::new)).map_err(Arc::new),
                Err(e) => Err(Arc::new(Error::Internal(format!("{url}: request task failed: {e}")))),
            }
        }
        .boxed()
        .shared();
        for (i, range) in ranges.iter().enumerate() {
            let name = range_key(key, range);
            let part: BoxFuture<'static, Fetched> = group.clone().map(move |g| g.map(|parts| parts.map(|p| p[i].clone()))).boxed();
            started.futures.insert(name.clone(), part.shared());
            started.order.push_back(name);
        }
        Self::forget_oldest(&mut started, self.state.options.max_in_flight);
    }

    /// Reads byte `ranges` of `key`: those prefetched are awaited, the rest fetched together.
    fn read_ranges(&self, key: &str, ranges: &[Range<u64>]) -> Result<Option<Vec<Bytes>>> {
        let mut parts: Vec<Option<Bytes>> = vec![None; ranges.len()];
        let mut missing = Vec::new();
        for (i, range) in ranges.iter().enumerate() {
            let started = lock(&self.prefetched).futures.remove(&range_key(key, range));
            match started {
                Some(shared) => match self.block_on(shared).map_err(|e| (*e).clone_error())? {
                    Some(bytes) => parts[i] = Some(bytes),
                    None => return Ok(None),
                },
                None => missing.push(i),
            }
        }
        if !missing.is_empty() {
            let wanted: Vec<Range<u64>> = missing.iter().map(|&i| ranges[i].clone()).collect();
            let Some(fetched) = self.block_on(self.ranges_future(key.to_string(), wanted))? else {
                return Ok(None);
            };
            for (i, bytes) in missing.into_iter().zip(fetched) {
                parts[i] = Some(bytes);
            }
        }
        Ok(Some(parts.into_iter().flatten().collect()))
    }

    /// Whether a value exists at `key` (one HEAD request).
    pub fn exists(&self, key: &str) -> Result<bool> {
        let url = self.key_url(key);
        Ok(absent_as_none(&url, self.block_on(self.client.head(&self.object_path(key))))?.is_some())
    }

    /// Writes `value` at `key` (one PUT: a reader sees the old value or the new one).
    pub fn write(&self, key: &str, value: Bytes) -> Result<()> {
        let url = self.key_url(key);
        self.block_on(self.client.put(&self.object_path(key), PutPayload::from_bytes(value)))
            .map(|_| ())
            .map_err(|e| remote_error(&url, e))
    }

    /// Deletes `key` (absent is fine).
    pub fn delete(&self, key: &str) -> Result<()> {
        let url = self.key_url(key);
        absent_as_none(&url, self.block_on(self.client.delete(&self.object_path(key)))).map(|_| ())
    }

    /// Keys below `prefix` (relative to this location), listed.
    pub fn list_keys(&self, prefix: &str) -> Result<Vec<String>> {
        use futures::TryStreamExt;
        let base = self.object_path(prefix);
        let url = self.key_url(prefix);
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let listed: Vec<object_store::ObjectMeta> = self
            .block_on(self.client.list(Some(&base)).try_collect())
            .map_err(|e| remote_error(&url, e))?;
        Ok(listed
            .into_iter()
            .map(|m| {
                m.location
                    .as_ref()
                    .strip_prefix(strip.as_str())
                    .unwrap_or(m.location.as_ref())
                    .to_string()
            })
            .collect())
    }

    /// One byte range of `key` that is not a bounded one (a shard index at the end of its shard,
    /// or an open end), through the disk cache like every other read.
    fn get_range(&self, key: &StoreKey, range: ByteRange) -> Result<Option<Bytes>> {
        let range = match range {
            ByteRange::FromStart(0, None) => return self.read(key.as_str()),
            ByteRange::FromStart(offset, None) => GetRange::Offset(offset),
            ByteRange::FromStart(offset, Some(length)) => GetRange::Bounded(offset..offset + length),
            ByteRange::Suffix(length) => GetRange::Suffix(length),
        };
        let request = self.request(key.as_str());
        let cached_as = open_range_key(&request.url, &range);
        if let Some(bytes) = request.disk.as_ref().and_then(|d| d.get(&cached_as)) {
            return Ok(Some(bytes));
        }
        let fetched = absent_as_none(&request.url, self.block_on(request.get(GetOptions::new().with_range(Some(range)))))?;
        if let (Some(d), Some(bytes)) = (&request.disk, &fetched) {
            d.put(&cached_as, bytes);
        }
        Ok(fetched)
    }
}

impl ReadableStorageTraits for RemoteStore {
    fn get(&self, key: &StoreKey) -> std::result::Result<MaybeBytes, StorageError> {
        match self.read(key.as_str()) {
            // zarrs probes for both formats' documents; S3 refuses (403) a missing key where
            // listing is not allowed, and the node's own documents were readable already.
            Err(e) if e.kind() == crate::error::ErrorKind::PermissionDenied && is_metadata_name(key.as_str()) => Ok(None),
            other => other.map_err(|e| storage_error(&e)),
        }
    }

    fn get_partial_many<'a>(
        &'a self,
        key: &StoreKey,
        byte_ranges: ByteRangeIterator<'a>,
    ) -> std::result::Result<MaybeBytesIterator<'a>, StorageError> {
        let byte_ranges: Vec<ByteRange> = byte_ranges.collect();
        // Ranges with both ends known (inner chunks) go out together; a suffix (a shard's
        // index) or an open end is one request of its own.
        let known: Option<Vec<Range<u64>>> = byte_ranges.iter().map(bounded).collect();
        if let Some(ranges) = known.filter(|r| !r.is_empty()) {
            return match self.read_ranges(key.as_str(), &ranges).map_err(|e| storage_error(&e))? {
                Some(parts) => Ok(Some(Box::new(parts.into_iter().map(Ok)))),
                None => Ok(None),
            };
        }
        let mut parts = Vec::new();
        for range in byte_ranges {
            match self.get_range(key, range).map_err(|e| storage_error(&e))? {
                Some(bytes) => parts.push(Ok(bytes)),
                None => return Ok(None),
            }
        }
        Ok(Some(Box::new(parts.into_iter())))
    }

    fn size_key(&self, key: &StoreKey) -> std::result::Result<Option<u64>, StorageError> {
        let url = self.key_url(key.as_str());
        absent_as_none(&url, self.block_on(self.client.head(&self.object_path(key.as_str()))))
            .map(|meta| meta.map(|m| m.size))
            .map_err(|e| storage_error(&e))
    }

    fn supports_get_partial(&self) -> bool {
        true
    }
}

impl WritableStorageTraits for RemoteStore {
    fn set(&self, key: &StoreKey, value: Bytes) -> std::result::Result<(), StorageError> {
        self.write(key.as_str(), value).map_err(|e| storage_error(&e))
    }

    fn set_partial_many(&self, key: &StoreKey, offset_values: OffsetBytesIterator) -> std::result::Result<(), StorageError> {
        // Objects are written whole: read, patch, write.
        store_set_partial_many(self, key, offset_values)
    }

    fn erase(&self, key: &StoreKey) -> std::result::Result<(), StorageError> {
        self.delete(key.as_str()).map_err(|e| storage_error(&e))
    }

    /// Deletes every key below `prefix`: one listing streamed into object_store's
    /// `delete_stream` (bulk deletes where the store has them, e.g. 1000 keys per S3 request).
    fn erase_prefix(&self, prefix: &StorePrefix) -> std::result::Result<(), StorageError> {
        use futures::{StreamExt, TryStreamExt};
        let url = self.key_url(prefix.as_str());
        let listed = self
            .client
            .list(Some(&self.object_path(prefix.as_str())))
            .map_ok(|m| m.location)
            .boxed();
        let deleted: Vec<object_store::Result<ObjectPath>> = self.block_on(self.client.delete_stream(listed).collect());
        for result in deleted {
            if let Err(e) = absent_as_none(&url, result) {
                return Err(storage_error(&e));
            }
        }
        Ok(())
    }

    fn supports_set_partial(&self) -> bool {
        false
    }
}

impl ListableStorageTraits for RemoteStore {
    fn list(&self) -> std::result::Result<StoreKeys, StorageError> {
        self.list_prefix(&StorePrefix::root())
    }

    fn list_prefix(&self, prefix: &StorePrefix) -> std::result::Result<StoreKeys, StorageError> {
        let keys = self.list_keys(prefix.as_str()).map_err(|e| storage_error(&e))?;
        keys.into_iter().map(|k| StoreKey::new(k).map_err(StorageError::from)).collect()
    }

    fn list_dir(&self, prefix: &StorePrefix) -> std::result::Result<StoreKeysPrefixes, StorageError> {
        // Not used by the engine (it never walks a remote prefix); derived from a full listing.
        let keys = self.list_prefix(prefix)?;
        let mut direct = Vec::new();
        let mut prefixes = std::collections::BTreeSet::new();
        for key in keys {
            let rest = &key.as_str()[prefix.as_str().len()..];
            match rest.split_once('/') {
                Some((dir, _)) => {
                    prefixes.insert(format!("{}{dir}/", prefix.as_str()));
                }
                None => direct.push(key),
            }
        }
        let prefixes = prefixes
            .into_iter()
            .map(|p| StorePrefix::new(p).map_err(StorageError::from))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(StoreKeysPrefixes::new(direct, prefixes))
    }

    fn size_prefix(&self, prefix: &StorePrefix) -> std::result::Result<u64, StorageError> {
        let keys = self.list_prefix(prefix)?;
        let mut total = 0;
        for key in keys {
            total += ReadableStorageTraits::size_key(self, &key)?.unwrap_or(0);
        }
        Ok(total)
    }
}

/// Whether a zarr group or array exists at each of `urls` (local paths and `file://` too).
/// Remote ones are asked together (one round trip) and never listed: the first is asked for
/// every format's documents, the others for the one document that answered there (one request
/// each; a node without it is asked for all, in case formats are mixed).
pub fn nodes_exist(urls: &[String]) -> Result<Vec<bool>> {
    const ALL: [&str; 4] = ["zarr.json", ".zgroup", ".zarray", ".zattrs"];
    let mut out: Vec<bool> = urls
        .iter()
        .map(|u| !is_remote(u) && ALL.iter().any(|n| local_path(u).join(n).is_file()))
        .collect();
    let remote: Vec<usize> = (0..urls.len()).filter(|&i| is_remote(&urls[i])).collect();
    let Some((&first, rest)) = remote.split_first() else {
        return Ok(out);
    };
    let found = probe_nodes(urls, &[first], &ALL)?;
    out[first] = found[0].is_some();
    let retry: Vec<usize> = match found[0] {
        Some(name) => {
            let answers = probe_nodes(urls, rest, &[name])?;
            let mut missing = Vec::new();
            for (&i, answer) in rest.iter().zip(answers) {
                out[i] = answer.is_some();
                if answer.is_none() {
                    missing.push(i);
                }
            }
            missing
        }
        None => rest.to_vec(),
    };
    for (&i, answer) in retry.iter().zip(probe_nodes(urls, &retry, &ALL)?) {
        out[i] = answer.is_some();
    }
    Ok(out)
}

/// For each of `urls[which]`, the first of `names` found there, all asked at once. S3 answers
/// 403 for a missing key where listing is not allowed: a refused document counts as absent
/// unless none was found at that node.
fn probe_nodes(urls: &[String], which: &[usize], names: &[&'static str]) -> Result<Vec<Option<&'static str>>> {
    let stores = which
        .iter()
        .map(|&i| {
            let store = RemoteStore::open(&urls[i])?;
            store.prefetch(names.iter().map(|n| n.to_string()));
            Ok(store)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut out = Vec::with_capacity(stores.len());
    for store in stores {
        // Every answer is awaited so that none is left behind in the store.
        let mut found = None;
        let mut denied = None;
        for &name in names {
            match store.read(name) {
                Ok(Some(_)) => {
                    found.get_or_insert(name);
                }
                Ok(None) => {}
                Err(e) if e.kind() == crate::error::ErrorKind::PermissionDenied => {
                    denied.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        match (found, denied) {
            (None, Some(e)) if names.len() > 1 => return Err(e),
            (found, _) => out.push(found),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_keep_the_url_and_status() {
        let status = |text: &str| object_store::Error::Generic {
            store: "HTTP",
            source: text.to_string().into(),
        };
        let e = remote_error(
            "s3://b/k/0.0.0",
            status("Server returned non-2xx status code: 503 Service Unavailable: slow down"),
        );
        assert_eq!(e.kind(), crate::error::ErrorKind::Io);
        assert!(e.to_string().starts_with("s3://b/k/0.0.0: HTTP 503"), "{e}");
        let e = remote_error("s3://b/k/0.0.0", status("Server returned non-2xx status code: 403 Forbidden"));
        assert_eq!(e.kind(), crate::error::ErrorKind::PermissionDenied);
        let missing = object_store::Error::NotFound {
            path: "k/.zattrs".into(),
            source: "404".to_string().into(),
        };
        assert!(matches!(remote_error("s3://b/k/.zattrs", missing), Error::NotFound { .. }));
        let timed_out = remote_error("http://h/x", status("error sending request: operation timed out"));
        assert!(timed_out.is_transient(), "{timed_out}");
    }

    #[test]
    fn urls_are_recognised_and_split() {
        assert!(is_remote("s3://bucket/a.zarr"));
        assert!(is_remote("https://host:8080/x"));
        assert!(!is_remote("file:///tmp/a.zarr"));
        assert!(!is_remote("/tmp/a.zarr"));
        assert!(!is_remote("ftp://host/a"));
        assert_eq!(local_path("file:///tmp/a.zarr"), PathBuf::from("/tmp/a.zarr"));
        assert_eq!(
            split_url("s3://bucket/a/b.zarr/").unwrap(),
            ("s3".to_string(), "bucket".to_string(), "a/b.zarr".to_string())
        );
        assert_eq!(
            split_url("http://127.0.0.1:9/").unwrap(),
            ("http".to_string(), "127.0.0.1:9".to_string(), String::new())
        );
        assert!(split_url("s3:///key").is_err());
        assert!(split_url("s3://b/a/../c").unwrap_err().to_string().contains(".."));
    }
}
