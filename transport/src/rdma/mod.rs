//! RDMA backend (in progress).
