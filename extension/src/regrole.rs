//! The SQL type `regrole` as a function argument: callers write a role's name
//! (`'payments_app'`) and PostgreSQL resolves it, with its own error for a role that does not
//! exist, before the function runs.

use pgrx::callconv::{Arg, ArgAbi};
use pgrx::prelude::*;
use pgrx::FromDatum;

pub struct RegRole(pub pg_sys::Oid);

impl FromDatum for RegRole {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        type_oid: pg_sys::Oid,
    ) -> Option<Self> {
        // SAFETY: regrole is an oid on the wire; the caller vouches for the datum.
        unsafe { pg_sys::Oid::from_polymorphic_datum(datum, is_null, type_oid) }.map(RegRole)
    }
}

// SAFETY: unboxed exactly like an oid, which is what a regrole datum is.
unsafe impl<'fcx> ArgAbi<'fcx> for RegRole {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        unsafe { arg.unbox_arg_using_from_datum() }
            .unwrap_or_else(|| panic!("argument {index} must not be null"))
    }
}

impl_sql_translatable!(RegRole, arg_only = "regrole");
