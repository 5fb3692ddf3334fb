"""Pipeline stages (plain modules; they may import orchestration and validation tools, the library may not)."""
