//! The archive bucket itself, for `setup`: its creation and its policy.

use super::json_api::Bucket;
use super::*;

impl Store {
    /// Creates the archive bucket, with uniform bucket-level access, public
    /// access prevention and `rules`, unless it exists; `true` if it was created.
    pub async fn create_bucket(&self, project: &str, rules: &[LifecycleRule]) -> Result<bool, StoreError> {
        let failed = |cause: StoreCause| StoreError {
            operation: "create bucket",
            target: format!("gs://{}", self.bucket),
            cause,
        };
        let body = Bucket {
            name: Some(self.bucket.clone()),
            ..Bucket::policy(rules)
        };
        let request = self
            .http
            .post(format!("{}/storage/v1/b", self.json_base))
            .query(&[("project", project)])
            .json(&body);
        let response = self.send(request).await.map_err(failed)?;
        if response.status() == reqwest::StatusCode::CONFLICT {
            return Ok(false);
        }
        checked(response).await.map_err(failed)?;
        Ok(true)
    }

    /// Makes the archive bucket's policy what `setup` wants (uniform
    /// bucket-level access, public access prevention enforced, `rules` as its
    /// lifecycle), patching only what differs; returns what was changed
    /// (empty: nothing was sent).
    pub async fn reconcile_bucket_policy(
        &self,
        rules: &[LifecycleRule],
    ) -> Result<Vec<&'static str>, StoreError> {
        let failed = |operation: &'static str| {
            move |cause: StoreCause| StoreError {
                operation,
                target: format!("gs://{}", self.bucket),
                cause,
            }
        };
        let url = format!("{}/storage/v1/b/{}", self.json_base, encode(&self.bucket));
        let request = self
            .http
            .get(&url)
            .query(&[("fields", "iamConfiguration,lifecycle")]);
        let current: Bucket = checked(self.send(request).await.map_err(failed("get bucket"))?)
            .await
            .map_err(failed("get bucket"))?
            .json()
            .await
            .map_err(|error| failed("get bucket")(error.into()))?;
        let wanted = Bucket::policy(rules);
        let mut patch = Bucket::default();
        let mut changed = Vec::new();
        let iam = current.iam_configuration.unwrap_or_default();
        if !iam
            .uniform_bucket_level_access
            .is_some_and(|access| access.enabled)
        {
            changed.push("uniform bucket-level access");
        }
        if iam.public_access_prevention.as_deref() != Some("enforced") {
            changed.push("public access prevention");
        }
        if !changed.is_empty() {
            patch.iam_configuration = wanted.iam_configuration;
        }
        if current.lifecycle.unwrap_or_default() != wanted.lifecycle.clone().unwrap_or_default() {
            changed.push("lifecycle rules");
            patch.lifecycle = wanted.lifecycle;
        }
        if patch.iam_configuration.is_none() && patch.lifecycle.is_none() {
            return Ok(changed);
        }
        let request = self.http.patch(&url).json(&patch);
        checked(self.send(request).await.map_err(failed("patch bucket"))?)
            .await
            .map_err(failed("patch bucket"))?;
        Ok(changed)
    }
}
