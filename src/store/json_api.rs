//! The JSON API's answers and request bodies that the store uses, typed.
//!
//! Only the fields the store reads or sets are declared; the API sends more
//! and they are ignored. The API sends 64-bit numbers as strings.

use crate::config::{LifecycleAction, LifecycleRule};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// An object resource (`storage#object`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Object {
    #[serde(default)]
    pub bucket: String,
    #[serde(default)]
    pub name: String,
    pub size: Option<Int64>,
    pub generation: Option<Int64>,
    pub crc32c: Option<String>,
    pub md5_hash: Option<String>,
    #[serde(default)]
    pub metadata: HashMap<String, Option<String>>,
    pub storage_class: Option<String>,
}

/// An int64 field: a string in the JSON API, a number in some emulators.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
pub(super) enum Int64 {
    Text(#[serde(deserialize_with = "from_text")] i64),
    Number(i64),
}

fn from_text<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(serde::de::Error::custom)
}

impl Int64 {
    pub fn get(self) -> i64 {
        match self {
            Int64::Text(value) | Int64::Number(value) => value,
        }
    }
}

/// The answer to `objects.rewrite`: done with the new object, or a token to call again with.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Rewrite {
    #[serde(default)]
    pub done: bool,
    pub rewrite_token: Option<String>,
    pub resource: Option<Object>,
}

/// An error answer: `{"error": {"message": ...}}`.
#[derive(Debug, Deserialize)]
pub(super) struct ErrorAnswer {
    pub error: ErrorDetail,
}

#[derive(Debug, Deserialize)]
pub(super) struct ErrorDetail {
    pub message: String,
}

/// The bucket fields `setup` sets (and reads back to compare): uniform
/// bucket-level access, public access prevention and the lifecycle rules.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Bucket {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iam_configuration: Option<IamConfiguration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<Lifecycle>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct IamConfiguration {
    pub uniform_bucket_level_access: Option<Enabled>,
    pub public_access_prevention: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub(super) struct Enabled {
    #[serde(default)]
    pub enabled: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub(super) struct Lifecycle {
    #[serde(default)]
    pub rule: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub(super) struct Rule {
    pub action: Action,
    pub condition: Condition,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Action {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Condition {
    pub age: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches_prefix: Vec<String>,
}

impl Bucket {
    /// The policy `setup` wants: uniform bucket-level access, public access
    /// prevention enforced, `rules` as the lifecycle.
    pub fn policy(rules: &[LifecycleRule]) -> Bucket {
        let rule = rules
            .iter()
            .map(|rule| Rule {
                action: match rule.action {
                    LifecycleAction::Delete => Action {
                        kind: "Delete".into(),
                        storage_class: None,
                    },
                    LifecycleAction::SetStorageClass(class) => Action {
                        kind: "SetStorageClass".into(),
                        storage_class: Some(class.into()),
                    },
                },
                condition: Condition {
                    age: Some(i64::from(rule.age_days)),
                    matches_prefix: rule.matches_prefix.clone(),
                },
            })
            .collect();
        Bucket {
            name: None,
            iam_configuration: Some(IamConfiguration {
                uniform_bucket_level_access: Some(Enabled { enabled: true }),
                public_access_prevention: Some("enforced".into()),
            }),
            lifecycle: Some(Lifecycle { rule }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_is_read_with_numbers_as_strings_or_numbers() -> Result<(), serde_json::Error> {
        let object: Object = serde_json::from_value(serde_json::json!({
            "bucket": "b", "name": "n", "size": "12", "generation": 7,
            "crc32c": "AAAAAA==", "metadata": {"k": "v"}, "unknown": true
        }))?;
        assert_eq!(object.size.map(Int64::get), Some(12));
        assert_eq!(object.generation.map(Int64::get), Some(7));
        assert_eq!(object.metadata["k"].as_deref(), Some("v"));
        Ok(())
    }

    #[test]
    fn the_policy_is_sent_in_the_json_api_shape() -> Result<(), serde_json::Error> {
        let rules = [LifecycleRule {
            age_days: 30,
            action: LifecycleAction::SetStorageClass("COLDLINE"),
            matches_prefix: vec!["audio/".into()],
        }];
        assert_eq!(
            serde_json::to_value(Bucket::policy(&rules))?,
            serde_json::json!({
                "iamConfiguration": {
                    "uniformBucketLevelAccess": {"enabled": true},
                    "publicAccessPrevention": "enforced",
                },
                "lifecycle": {"rule": [{
                    "action": {"type": "SetStorageClass", "storageClass": "COLDLINE"},
                    "condition": {"age": 30, "matchesPrefix": ["audio/"]},
                }]},
            })
        );
        Ok(())
    }
}
