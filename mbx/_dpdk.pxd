# DPDK extern declarations (DPDK 22.11 ABI), one section per header.
#
# Only what mbx._dpdkport uses.  Structs list the fields we touch; Cython takes the
# layout from the real headers.  Static inline functions (rte_eth_rx_burst,
# rte_pktmbuf_alloc, ...) are declared like ordinary functions: no C shim.
# Function-like macros get a typed face in a small verbatim block.
#
# Core modules must not cimport this file: it pulls rte_*.h into their build.
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.stdio cimport FILE


# ---------------------------------------------------------------- rte_errno.h
cdef extern from "rte_errno.h" nogil:
    # A per-lcore (thread-local) variable behind a macro; often 0 on failure.
    int rte_errno
    const char *rte_strerror(int errnum)


# ---------------------------------------------------------------- rte_log.h
cdef extern from "rte_log.h" nogil:
    int rte_openlog_stream(FILE *f)
    FILE *rte_log_get_stream()


# ---------------------------------------------------------------- rte_eal.h
cdef extern from "rte_eal.h" nogil:
    int rte_eal_init(int argc, char **argv)
    int rte_eal_cleanup()


# ---------------------------------------------------------------- rte_interrupts.h
cdef extern from "rte_interrupts.h" nogil:
    # EAL's interrupt thread waits on these sources and runs their callbacks, one at
    # a time; drivers handle their control events there (memif's control channel).
    # The instance functions are experimental in 22.11 (ALLOW_EXPERIMENTAL_API).
    enum:
        RTE_INTR_INSTANCE_F_PRIVATE     # the handle in malloc'd memory, not EAL's

    enum rte_intr_handle_type:
        RTE_INTR_HANDLE_EXT             # EAL only calls back; the callback reads

    struct rte_intr_handle:
        pass

    ctypedef void (*rte_intr_callback_fn)(void *cb_arg) noexcept nogil
    int rte_intr_callback_register(const rte_intr_handle *intr_handle,
                                   rte_intr_callback_fn cb, void *cb_arg)
    rte_intr_handle *rte_intr_instance_alloc(uint32_t flags)
    void rte_intr_instance_free(rte_intr_handle *intr_handle)
    int rte_intr_fd_set(rte_intr_handle *intr_handle, int fd)
    int rte_intr_type_set(rte_intr_handle *intr_handle, rte_intr_handle_type type)


# ---------------------------------------------------------------- rte_alarm.h
cdef extern from "rte_alarm.h" nogil:
    # An alarm's callback runs once in EAL's interrupt thread (tests use one to keep
    # that thread busy).
    ctypedef void (*rte_eal_alarm_callback)(void *arg) noexcept nogil
    int rte_eal_alarm_set(uint64_t us, rte_eal_alarm_callback cb, void *cb_arg)


# ---------------------------------------------------------------- rte_lcore.h
cdef extern from "rte_lcore.h" nogil:
    unsigned int rte_lcore_id()
    unsigned int rte_socket_id()
    unsigned int rte_lcore_count()


# ---------------------------------------------------------------- rte_dev.h
cdef extern from "rte_dev.h" nogil:
    # The bus-generic way to attach a vdev: rte_vdev_init lives in librte_bus_vdev,
    # which `pkg-config --libs libdpdk` does not link.
    int rte_eal_hotplug_add(const char *busname, const char *devname, const char *drvargs)
    int rte_eal_hotplug_remove(const char *busname, const char *devname)


# ---------------------------------------------------------------- rte_mempool.h
cdef extern from "rte_mempool.h" nogil:
    struct rte_mempool:
        uint32_t size

    void rte_mempool_free(rte_mempool *mp)
    unsigned int rte_mempool_avail_count(const rte_mempool *mp)
    unsigned int rte_mempool_in_use_count(const rte_mempool *mp)


# ---------------------------------------------------------------- rte_mbuf.h
cdef extern from "rte_mbuf.h" nogil:
    """
    /* rte_pktmbuf_mtod(m, t) is a macro taking a type: a typed face for bytes. */
    static inline unsigned char *mbx_pktmbuf_mtod(const struct rte_mbuf *m) {
        return rte_pktmbuf_mtod(m, unsigned char *);
    }
    """
    unsigned char *rte_pktmbuf_mtod "mbx_pktmbuf_mtod"(const rte_mbuf *m)

cdef extern from "rte_mbuf.h" nogil:
    enum:
        RTE_PKTMBUF_HEADROOM
        RTE_MBUF_DEFAULT_BUF_SIZE

    struct rte_mbuf:
        uint16_t buf_len
        uint16_t data_off
        uint16_t nb_segs
        uint16_t port
        uint64_t ol_flags
        uint32_t pkt_len
        uint16_t data_len
        rte_mbuf *next
        rte_mempool *pool

    rte_mempool *rte_pktmbuf_pool_create(const char *name, unsigned int n,
                                         unsigned int cache_size, uint16_t priv_size,
                                         uint16_t data_room_size, int socket_id)
    rte_mbuf *rte_pktmbuf_alloc(rte_mempool *mp)
    int rte_pktmbuf_alloc_bulk(rte_mempool *pool, rte_mbuf **mbufs, unsigned int count)
    void rte_pktmbuf_free(rte_mbuf *m)
    void rte_pktmbuf_free_bulk(rte_mbuf **mbufs, unsigned int count)
    char *rte_pktmbuf_append(rte_mbuf *m, uint16_t len)
    uint16_t rte_pktmbuf_tailroom(const rte_mbuf *m)
    uint16_t rte_pktmbuf_data_room_size(rte_mempool *mp)
    int rte_pktmbuf_chain(rte_mbuf *head, rte_mbuf *tail)
    # Pointer to len bytes at off: into the mbuf when contiguous, else copied to buf.
    const void *rte_pktmbuf_read(const rte_mbuf *m, uint32_t off, uint32_t len, void *buf)


# ---------------------------------------------------------------- rte_mbuf_dyn.h
cdef extern from "rte_mbuf_dyn.h" nogil:
    """
    /* RTE_MBUF_DYNFIELD(m, offset, type) is a macro: the Rx timestamp field. */
    static inline uint64_t mbx_mbuf_rx_timestamp(const struct rte_mbuf *m, int offset) {
        return *RTE_MBUF_DYNFIELD(m, offset, const rte_mbuf_timestamp_t *);
    }
    """
    uint64_t mbuf_rx_timestamp "mbx_mbuf_rx_timestamp"(const rte_mbuf *m, int offset)

cdef extern from "rte_mbuf_dyn.h" nogil:
    int rte_mbuf_dyn_rx_timestamp_register(int *field_offset, uint64_t *rx_flag)


# ---------------------------------------------------------------- rte_ethdev.h
cdef extern from "rte_ethdev.h" nogil:
    enum:
        RTE_ETH_NAME_MAX_LEN
        RTE_MAX_ETHPORTS
    const uint64_t RTE_ETH_RX_OFFLOAD_TIMESTAMP
    const uint64_t RTE_ETH_TX_OFFLOAD_MULTI_SEGS

    struct rte_eth_rxmode:
        uint64_t offloads

    struct rte_eth_txmode:
        uint64_t offloads

    struct rte_eth_conf:
        rte_eth_rxmode rxmode
        rte_eth_txmode txmode

    struct rte_eth_dev_info:
        const char *driver_name
        uint16_t max_rx_queues
        uint16_t max_tx_queues
        uint64_t rx_offload_capa
        uint64_t tx_offload_capa

    struct rte_eth_stats:
        uint64_t ipackets
        uint64_t opackets
        uint64_t ibytes
        uint64_t obytes
        uint64_t imissed
        uint64_t ierrors
        uint64_t oerrors
        uint64_t rx_nombuf

    # link_status is a bit-field in the C struct; Cython only names it.
    struct rte_eth_link:
        uint32_t link_speed
        uint16_t link_status

    struct rte_eth_rxconf:
        pass

    struct rte_eth_txconf:
        pass

    int rte_eth_dev_configure(uint16_t port_id, uint16_t nb_rx_queue,
                              uint16_t nb_tx_queue, const rte_eth_conf *eth_conf)
    int rte_eth_dev_adjust_nb_rx_tx_desc(uint16_t port_id, uint16_t *nb_rx_desc,
                                         uint16_t *nb_tx_desc)
    int rte_eth_rx_queue_setup(uint16_t port_id, uint16_t rx_queue_id, uint16_t nb_rx_desc,
                               unsigned int socket_id, const rte_eth_rxconf *rx_conf,
                               rte_mempool *mb_pool)
    int rte_eth_tx_queue_setup(uint16_t port_id, uint16_t tx_queue_id, uint16_t nb_tx_desc,
                               unsigned int socket_id, const rte_eth_txconf *tx_conf)
    int rte_eth_dev_start(uint16_t port_id)
    int rte_eth_dev_stop(uint16_t port_id)
    int rte_eth_dev_close(uint16_t port_id)
    int rte_eth_dev_is_valid_port(uint16_t port_id)
    int rte_eth_dev_socket_id(uint16_t port_id)
    int rte_eth_dev_get_port_by_name(const char *name, uint16_t *port_id)
    int rte_eth_dev_get_name_by_port(uint16_t port_id, char *name)
    int rte_eth_dev_info_get(uint16_t port_id, rte_eth_dev_info *dev_info)
    int rte_eth_dev_get_mtu(uint16_t port_id, uint16_t *mtu)
    int rte_eth_stats_get(uint16_t port_id, rte_eth_stats *stats)
    int rte_eth_promiscuous_enable(uint16_t port_id)
    int rte_eth_promiscuous_disable(uint16_t port_id)
    int rte_eth_promiscuous_get(uint16_t port_id)
    int rte_eth_link_get_nowait(uint16_t port_id, rte_eth_link *link)

    uint16_t rte_eth_rx_burst(uint16_t port_id, uint16_t queue_id,
                              rte_mbuf **rx_pkts, uint16_t nb_pkts)
    uint16_t rte_eth_tx_burst(uint16_t port_id, uint16_t queue_id,
                              rte_mbuf **tx_pkts, uint16_t nb_pkts)
