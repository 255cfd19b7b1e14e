//! What a commit may contain, checked before any forge writes anything.

use super::ChangeSet;
use crate::event::ErrorCode;
use crate::sandbox::FileContent;

/// GitHub refuses blobs above 100 MiB.
pub const MAX_BLOB_BYTES: usize = 100 * 1024 * 1024;

#[derive(Debug, Clone, Default)]
pub struct CommitPolicy {
    pub allow_workflow_changes: bool,
}

impl CommitPolicy {
    /// Refuses changes no commit of ours may contain, with a message that names the file.
    pub fn check(&self, change: &ChangeSet) -> Result<(), super::ForgeError> {
        for file in &change.files {
            let path = file.path.as_str();
            // RepoPath already refuses `.git` and `..`; this is the second line of defence.
            if path.is_empty()
                || path
                    .split('/')
                    .any(|c| c == ".." || c.eq_ignore_ascii_case(".git"))
            {
                return Err(super::ForgeError::new(
                    ErrorCode::PathRefused,
                    format!("`{path}` may not be committed"),
                ));
            }
            if !self.allow_workflow_changes && path.starts_with(".github/workflows/") {
                return Err(super::ForgeError::new(
                    ErrorCode::WorkflowChangeRefused,
                    format!(
                        "`{path}` changes a GitHub Actions workflow; most tokens may not push workflows, so this is refused unless ALLOW_WORKFLOW_CHANGES=true"
                    ),
                ));
            }
            if let FileContent::File { bytes, .. } = &file.content
                && bytes.len() > MAX_BLOB_BYTES
            {
                return Err(super::ForgeError::new(
                    ErrorCode::FileTooLarge,
                    format!(
                        "`{path}` is {} MiB; GitHub accepts files up to 100 MiB",
                        bytes.len() / (1024 * 1024)
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::FileStatus;
    use crate::forge::ChangedFile;
    use crate::sandbox::RepoPath;

    fn change(path: &str, bytes: usize) -> ChangeSet {
        ChangeSet {
            base_commit: "0".repeat(40),
            files: vec![ChangedFile {
                path: RepoPath::parse(path).unwrap(),
                status: FileStatus::Added,
                additions: 1,
                deletions: 0,
                content: FileContent::File {
                    bytes: vec![b'x'; bytes],
                    executable: false,
                },
            }],
            patch: String::new(),
            patch_truncated: false,
        }
    }

    #[test]
    fn workflow_changes_need_the_setting() {
        let refused = CommitPolicy::default()
            .check(&change(".github/workflows/ci.yml", 10))
            .unwrap_err();
        assert_eq!(refused.code, "workflow_change_refused");
        assert!(refused.message.contains("ALLOW_WORKFLOW_CHANGES=true"));
        let allowed = CommitPolicy {
            allow_workflow_changes: true,
        };
        assert!(
            allowed
                .check(&change(".github/workflows/ci.yml", 10))
                .is_ok()
        );
        assert!(
            CommitPolicy::default()
                .check(&change(".github/CODEOWNERS", 10))
                .is_ok()
        );
    }

    #[test]
    fn files_above_the_blob_limit_are_refused_by_name() {
        let err = CommitPolicy::default()
            .check(&change("big.bin", MAX_BLOB_BYTES + 1))
            .unwrap_err();
        assert_eq!(err.code, "file_too_large");
        assert!(err.message.contains("big.bin"));
        assert!(
            CommitPolicy::default()
                .check(&change("ok.bin", 1024))
                .is_ok()
        );
    }
}
