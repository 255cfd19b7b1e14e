//! The words of a pull request: its branch name, title, body and the job's summary, all derived
//! from the request and what the agent said.

use crate::agent::runner::{AgentEnd, AgentOutcome};
use crate::event::FileStatus;
use crate::forge::ChangeSet;

pub(super) fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

pub(super) fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

pub(super) fn outcome_text(outcome: &AgentOutcome) -> String {
    outcome
        .finish
        .as_ref()
        .map(|f| f.summary.clone())
        .unwrap_or_else(|| outcome.last_text.clone())
        .chars()
        .take(500)
        .collect()
}

pub(super) fn summary_of(outcome: &AgentOutcome) -> String {
    let text = outcome_text(outcome);
    if text.trim().is_empty() {
        "The agent made the change described in the request.".into()
    } else {
        text
    }
}

pub(super) fn pr_title(outcome: &AgentOutcome, prompt: &str) -> String {
    let title = outcome
        .finish
        .as_ref()
        .map(|f| f.title.trim().to_owned())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| prompt.lines().next().unwrap_or("Change").trim().to_owned());
    let mut title: String = title.chars().take(72).collect();
    if outcome.partial() {
        title = format!("[partial] {title}");
    }
    title
}

/// `tiny-backspace/<slug>-<short id>`: readable, and unique per job.
pub fn branch_name(prompt: &str, job_id: &str) -> String {
    let mut slug = String::new();
    for word in prompt
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(6)
    {
        if slug.len() + word.len() > 40 {
            break;
        }
        if !slug.is_empty() {
            slug.push('-');
        }
        slug.push_str(&word.to_ascii_lowercase());
    }
    if slug.is_empty() {
        slug.push_str("change");
    }
    let short_id: String = job_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(8)
        .collect();
    format!("tiny-backspace/{slug}-{short_id}")
}

pub(super) fn pr_body(
    summary: &str,
    prompt: &str,
    change: &ChangeSet,
    outcome: &AgentOutcome,
    job_id: &str,
) -> String {
    let mut body = String::new();
    body.push_str(summary.trim());
    body.push_str("\n\n## Request\n\n");
    for line in prompt.trim().lines() {
        body.push_str("> ");
        body.push_str(line);
        body.push('\n');
    }
    body.push_str("\n## Files changed\n\n| File | Change | + | − |\n|---|---|---:|---:|\n");
    for file in &change.files {
        let status = match file.status {
            FileStatus::Added => "added",
            FileStatus::Modified => "modified",
            FileStatus::Deleted => "deleted",
            FileStatus::Renamed => "renamed",
        };
        body.push_str(&format!(
            "| `{}` | {status} | {} | {} |\n",
            file.path.as_str().replace('|', "\\|"),
            file.additions,
            file.deletions
        ));
    }
    let mut notes = Vec::new();
    if outcome.used_dummy {
        notes.push("This change was made by the built-in **dummy agent**, because no model provider was available. Review it as a placeholder.".to_owned());
    }
    match &outcome.end {
        AgentEnd::Finished => {}
        AgentEnd::Stopped => notes.push(
            "The agent stopped without saying it was done; this may be **partial work**.".into(),
        ),
        AgentEnd::Budget(why) => notes.push(format!("This is **partial work**: {why}.")),
        AgentEnd::OutOfTime(budget) => notes.push(format!(
            "This is **partial work**: the agent's time budget of {} s ran out.",
            budget.as_secs()
        )),
        AgentEnd::Loop => notes.push(
            "This is **partial work**: the agent kept repeating itself and was stopped.".into(),
        ),
        AgentEnd::Refused(_) => {}
    }
    if !notes.is_empty() {
        body.push_str("\n## Notes\n\n");
        for note in notes {
            body.push_str(&format!("- {note}\n"));
        }
    }
    body.push_str(&format!(
        "\n---\nOpened by Tiny Backspace (job `{job_id}`).\n"
    ));
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_names_are_slugged_and_unique_per_job() {
        assert_eq!(
            branch_name(
                "Add input validation to all POST endpoints!",
                "3f2a9c1e-77aa"
            ),
            "tiny-backspace/add-input-validation-to-all-post-3f2a9c1e"
        );
        assert_eq!(branch_name("¿¿", "abc"), "tiny-backspace/change-abc");
    }
}
