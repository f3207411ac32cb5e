//! Admin replacement (DESIGN rule 8): which replacements take effect, and how conflicts
//! between them resolve from journal evidence alone.
//!
//! The rule, applied as the reducer folds facts in `(epoch, id)` order:
//!
//! - A replacement of `old` written at epoch `e` is valid only if `old` is the admin at `e`,
//!   `activation_epoch > e` (so every operation the old admin signs at or after the
//!   activation epoch is folded after the replacement and judged by it, whatever the ids),
//!   `new` is a member at `e` and differs from `old`, and it is either written by `old`
//!   itself (`AdminReplacement`) or carries the authority's threshold signature over
//!   [`AdminReplacement::signing_message`] that verifies against the group key of the
//!   membership at `e` (`CertifiedAdminReplacement`, written by any member).
//! - Of several valid replacements of the same admin, the first in `(epoch, id)` order wins
//!   and later ones are ignored (kept as evidence), with one exception: a threshold-signed
//!   replacement overrides a self-issued one that has not yet taken effect (its activation
//!   epoch is above the certified fact's epoch). The authority as a whole outranks its admin
//!   alone, so a compromised admin cannot lock in a successor of its choosing by replacing
//!   itself first; and since the overridden replacement was not yet in effect, nothing the
//!   fold has already judged depended on it.

use crate::fact::VerifiedFact;
use crate::maintenance::AdminReplacement;
use crate::reduce::{AppliedReplacement, MaintenanceState};

impl MaintenanceState {
    /// Folds one admin replacement; `signature` is the threshold signature of a certified
    /// replacement, `None` for one issued by the old admin itself.
    pub(crate) fn apply_replacement(
        &mut self,
        f: &VerifiedFact,
        r: &AdminReplacement,
        signature: Option<&[u8; 64]>,
    ) {
        let epoch = f.epoch();
        let issuer_ok = match signature {
            None => f.author() == r.old_admin,
            Some(sig) => self
                .membership_at(epoch)
                .is_some_and(|m| m.group_key.verify(&r.signing_message(&self.namespace), sig)),
        };
        let valid = issuer_ok
            && r.activation_epoch > epoch
            && r.new_admin != r.old_admin
            && self.is_admin_at(&r.old_admin, epoch)
            && self.is_member_at(&r.new_admin, epoch);
        if !valid {
            self.ignored.insert(f.id());
            return;
        }
        let applied = AppliedReplacement {
            replacement: r.clone(),
            fact_id: f.id(),
            certified: signature.is_some(),
        };
        let existing = self
            .replacements
            .iter()
            .position(|a| a.replacement.old_admin == r.old_admin);
        match existing {
            None => self.replacements.push(applied),
            Some(i) => {
                let prior = &self.replacements[i];
                let overridable = signature.is_some()
                    && !prior.certified
                    && prior.replacement.activation_epoch > epoch;
                if overridable {
                    self.ignored.insert(prior.fact_id);
                    self.replacements[i] = applied;
                } else {
                    self.ignored.insert(f.id());
                }
            }
        }
    }

    /// The replacement of the admin in charge at `epoch` that is scheduled but not yet in
    /// effect, if any.
    pub fn pending_replacement(&self, epoch: crate::ids::Epoch) -> Option<&AppliedReplacement> {
        let admin = self.admin_at(epoch)?;
        self.replacements
            .iter()
            .find(|r| r.replacement.old_admin == admin && r.replacement.activation_epoch > epoch)
    }
}
