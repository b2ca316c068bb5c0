//! The element types the engine reads and writes, in one table: each type's numpy name, size,
//! zarr v2 type string and zarrs data type, and one dispatch macro from a [`DType`] to its Rust
//! type. Every other mapping (reading an array's type, parsing a writer's `dtype`, creating an
//! array, decoding a chunk) goes through these two.

use zarrs::array::{data_type, DataType};

use crate::error::{Error, Result};

/// Element types the engine reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// uint8
    U8,
    /// uint16
    U16,
    /// uint32
    U32,
    /// uint64
    U64,
    /// int8
    I8,
    /// int16
    I16,
    /// int32
    I32,
    /// int64
    I64,
    /// float32
    F32,
    /// float64
    F64,
}

struct Row {
    dtype: DType,
    name: &'static str,
    size: usize,
    /// The little-endian numpy type string zarr v2 names the type by.
    v2: &'static str,
    zarrs: fn() -> DataType,
}

const TABLE: [Row; 10] = [
    Row {
        dtype: DType::U8,
        name: "uint8",
        size: 1,
        v2: "|u1",
        zarrs: data_type::uint8,
    },
    Row {
        dtype: DType::U16,
        name: "uint16",
        size: 2,
        v2: "<u2",
        zarrs: data_type::uint16,
    },
    Row {
        dtype: DType::U32,
        name: "uint32",
        size: 4,
        v2: "<u4",
        zarrs: data_type::uint32,
    },
    Row {
        dtype: DType::U64,
        name: "uint64",
        size: 8,
        v2: "<u8",
        zarrs: data_type::uint64,
    },
    Row {
        dtype: DType::I8,
        name: "int8",
        size: 1,
        v2: "|i1",
        zarrs: data_type::int8,
    },
    Row {
        dtype: DType::I16,
        name: "int16",
        size: 2,
        v2: "<i2",
        zarrs: data_type::int16,
    },
    Row {
        dtype: DType::I32,
        name: "int32",
        size: 4,
        v2: "<i4",
        zarrs: data_type::int32,
    },
    Row {
        dtype: DType::I64,
        name: "int64",
        size: 8,
        v2: "<i8",
        zarrs: data_type::int64,
    },
    Row {
        dtype: DType::F32,
        name: "float32",
        size: 4,
        v2: "<f4",
        zarrs: data_type::float32,
    },
    Row {
        dtype: DType::F64,
        name: "float64",
        size: 8,
        v2: "<f8",
        zarrs: data_type::float64,
    },
];

impl DType {
    fn row(self) -> &'static Row {
        // The table lists the variants in declaration order.
        &TABLE[self as usize]
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        self.row().size
    }

    /// numpy-style name.
    pub fn name(self) -> &'static str {
        self.row().name
    }

    /// The little-endian numpy type string zarr v2 names the type by.
    pub fn v2_name(self) -> &'static str {
        self.row().v2
    }

    /// Whether values are floating point.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64)
    }

    /// The zarrs data type of arrays of this type.
    pub fn zarrs(self) -> DataType {
        (self.row().zarrs)()
    }

    /// The type a numpy-style name (`"float32"`, `"uint8"`, …) names.
    pub fn from_name(name: &str) -> Result<DType> {
        TABLE.iter().find(|r| r.name == name).map(|r| r.dtype).ok_or_else(|| {
            Error::invalid(format!(
                "dtype must be a float or integer type name such as 'float32', not '{name}'"
            ))
        })
    }

    /// The type of an array's zarrs data type; `None` for types the engine does not read
    /// (bool, complex, strings, …).
    pub fn from_zarrs(data_type: &DataType) -> Option<DType> {
        TABLE.iter().find(|r| (r.zarrs)() == *data_type).map(|r| r.dtype)
    }
}

/// Runs `$body` with `$t` the Rust element type of `$dtype` (a [`DType`]).
#[macro_export]
#[doc(hidden)]
macro_rules! with_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            $crate::format::dtype::DType::U8 => {
                type $t = u8;
                $body
            }
            $crate::format::dtype::DType::U16 => {
                type $t = u16;
                $body
            }
            $crate::format::dtype::DType::U32 => {
                type $t = u32;
                $body
            }
            $crate::format::dtype::DType::U64 => {
                type $t = u64;
                $body
            }
            $crate::format::dtype::DType::I8 => {
                type $t = i8;
                $body
            }
            $crate::format::dtype::DType::I16 => {
                type $t = i16;
                $body
            }
            $crate::format::dtype::DType::I32 => {
                type $t = i32;
                $body
            }
            $crate::format::dtype::DType::I64 => {
                type $t = i64;
                $body
            }
            $crate::format::dtype::DType::F32 => {
                type $t = f32;
                $body
            }
            $crate::format::dtype::DType::F64 => {
                type $t = f64;
                $body
            }
        }
    };
}
pub use with_dtype;

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [DType; 10] = [
        DType::U8,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::F32,
        DType::F64,
    ];

    #[test]
    fn the_table_agrees_with_rust_and_zarrs() {
        for dtype in ALL {
            assert_eq!(dtype.row().dtype, dtype, "row order");
            assert_eq!(with_dtype!(dtype, T => std::mem::size_of::<T>()), dtype.size());
            assert_eq!(DType::from_name(dtype.name()).unwrap(), dtype);
            assert_eq!(DType::from_zarrs(&dtype.zarrs()), Some(dtype));
            assert_eq!(
                dtype.is_float(),
                with_dtype!(dtype, T => std::any::type_name::<T>().starts_with('f'))
            );
        }
        assert!(DType::from_name("bool").unwrap_err().to_string().contains("'bool'"));
        assert_eq!(DType::from_zarrs(&data_type::bool()), None);
    }
}
