/* SPDX-License-Identifier: Apache-2.0 */
/* _fastadd.c — the compiled common case of XdpProvider._add_run.
 *
 * Contract:
 *   bind(op_type, ctx_type, dir_type, held_type) -> None
 *     once, before add_new: the slotted classes whose fields add_new reads
 *     and writes in place (by their member offsets, found here; an instance
 *     of any other type, a subclass included, is left to Python).
 *     ``held_type`` instances are made without calling its __init__: their
 *     three slots (slot, ctx, gen) are set directly.
 *   add_new(run, i, stop, p4, p6, index, free, used, lu, by_slot,
 *           gen, priv_idx, val_size) -> (j, new)
 *
 *   Walks run[i:stop] (Op objects of kind ADD) and installs, in the
 *   provider's indexes and the family's pending buffers, every op that is
 *   the common case: a new connection (ctx.priv, a list, has None at
 *   ``priv_idx``), both directions resolved, of one family (4 or 6) and
 *   protocol, with fields of the right size and range, whose two keys are
 *   distinct and held by nobody in ``index`` (a KeyIndex), while a free
 *   slot is left. It stops at the first op that is anything else and
 *   returns its index ``j`` (== stop when it got through), having changed
 *   nothing for that op: ``XdpProvider`` handles it with the Python code,
 *   which is the definition of every uncommon case. ``new`` is the number
 *   of connections it installed.
 *
 *   For each op it handles it does exactly what the Python common path
 *   does: the two keys and values are those of xdp_layout.conn_entries_into
 *   (checked byte for byte by tests/unit/test_fastadd.py); with n =
 *   len(p.written) and ks the key size, the keys are written at
 *   p.kbuf[n * 2 * ks] and the values at p.vbuf[n * 2 * val_size]; the slot
 *   is the int object free[len(free) - 1 - used - k] (a list) for the k-th
 *   op handled (the caller deletes the consumed tail of ``free``
 *   afterwards, in one go); index.put(slot, (k0, k1)), lu[slot] = 0,
 *   by_slot[slot] = ctx.priv[priv_idx] = held_type(slot, ctx, gen),
 *   op.err = 0, p.written.append(op). Nothing per connection is allocated
 *   but the held_type instance.
 *
 *   KeyIndex(nslots) -> index
 *     the key -> slot index of ctxdp.providers.keyindex (its contract),
 *     over _keyindex.h: memory for every slot taken and populated here.
 *
 *   Writer() -> w
 *     one native thread that runs BPF_MAP_UPDATE_BATCH without the GIL.
 *     w.submit(fd, keys, values, count) -> job: queue a write of ``count``
 *     entries packed back to back in the two buffers (held until the job
 *     is waited for; a bytearray cannot be resized meanwhile). Jobs run in
 *     submission order; at most 256 may be outstanding (not waited for). w.wait(job) -> (done, errno): block (GIL released)
 *     until it ran; ``done`` entries went in, and errno is 0 when all did,
 *     else the errno of entry ``done`` (bpfsys.map_update_batch's
 *     semantics: a refusal up front has done == 0). w.close() waits for
 *     the queue and ends the thread (also on dealloc). The thread polls for
 *     a while after each job, then sleeps; w.wake() gets it polling again.
 *     One thread submits and waits (the provider is single-threaded). In a
 *     child after fork() the parent's queue is dropped and a new thread
 *     starts on the next submit.
 *
 * Why C: this loop is what the batched install rate rests on. In Python it
 * costs ~3.5 us per connection, three times what the kernel needs for the
 * two hash inserts (which run meanwhile in XdpProvider's writer thread), so
 * Python alone kept the rate near 250k connections/s. Why a native writer:
 * a Python writer thread must win the GIL from the packing loop before each
 * syscall, which costs more than it overlaps (measured: 1000-ADD batches
 * in 250-connection chunks ran at half the unpipelined rate); this thread
 * never touches Python objects, so the kernel's hash inserts (~0.3-0.6 us
 * per entry) run fully alongside the packing.
 *
 * Layouts come from bpf/ct_offload.h (the one definition); only the part of
 * struct ct_flow_val before the per-CPU counters is used here, since the
 * counter slot count is a property of the machine the provider runs on
 * (``val_size`` is passed in).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <linux/bpf.h>
#include <linux/types.h>
#include <sys/syscall.h>

#include "ct_offload.h"
#include "_keyindex.h"

#include "structmember.h"

#define IPPROTO_ICMP_ 1
#define IPPROTO_ICMPV6_ 58

/* Interned attribute names of _Pending, made once at import. */
static PyObject *s_written, *s_kbuf, *s_vbuf;
static PyObject *zero;

/* The bound classes and the byte offsets of their slots (bind()). Reading a
 * slot in place is a load; PyObject_GetAttr is a type lookup and a
 * descriptor call, and this loop reads 18 of them per connection. */
static PyTypeObject *op_type, *ctx_type, *dir_type, *held_type;
static Py_ssize_t off_op_ctx, off_op_err, off_ctx_priv, off_ctx_dirs;
static Py_ssize_t off_in_ifindex, off_match, off_out, off_out_ifindex, off_src_mac,
	off_dst_mac, off_mtu;
static Py_ssize_t off_h_slot, off_h_ctx, off_h_gen;

#define SLOT(o, off) (*(PyObject **)((char *)(o) + (off)))

/* The slot of ``o`` at ``off`` (borrowed); NULL when unset. */
static inline PyObject *get(PyObject *o, Py_ssize_t off)
{
	return SLOT(o, off);
}

/* Store a new reference to ``v`` in the slot of ``o`` at ``off``. */
static inline void put(PyObject *o, Py_ssize_t off, PyObject *v)
{
	PyObject *old = SLOT(o, off);
	Py_INCREF(v);
	SLOT(o, off) = v;
	Py_XDECREF(old);
}

/* One direction, read out of a FlowDir. Everything borrowed from it stays
 * alive as long as the FlowDir (held by the ctx, held by the op). */
struct dir {
	long fam, proto;
	const uint8_t *msrc, *mdst, *osrc, *odst; /* addr_len bytes each */
	long msp, mdp, osp, odp;                  /* host order */
	uint32_t in_ifindex, out_ifindex;
	const uint8_t *smac, *dmac;
	uint16_t mtu;
};

/* A Python int in [lo, hi] into *out; 0 if it is not one (no exception). */
static int int_in(PyObject *o, long lo, long hi, long *out)
{
	if (!PyLong_CheckExact(o))
		return 0;
	int overflow;
	long v = PyLong_AsLongAndOverflow(o, &overflow);
	if (overflow || (v == -1 && PyErr_Occurred())) {
		PyErr_Clear();
		return 0;
	}
	if (v < lo || v > hi)
		return 0;
	*out = v;
	return 1;
}

static int bytes_of(PyObject *o, Py_ssize_t len, const uint8_t **out)
{
	if (!PyBytes_CheckExact(o) || PyBytes_GET_SIZE(o) != len)
		return 0;
	*out = (const uint8_t *)PyBytes_AS_STRING(o);
	return 1;
}

/* The tuple (family, proto, src, dst, sport, dport) ``t`` into the match or
 * out part of ``d``. 1 if it fits the common case, 0 if not, -1 on error. */
static int tuple_into(PyObject *t, int is_out, struct dir *d)
{
	if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 6)
		return 0;
	long fam, proto, sp, dp;
	if (!int_in(PyTuple_GET_ITEM(t, 0), 4, 6, &fam) || (fam != 4 && fam != 6))
		return 0;
	if (!int_in(PyTuple_GET_ITEM(t, 1), 0, 255, &proto))
		return 0;
	if (!int_in(PyTuple_GET_ITEM(t, 4), 0, 65535, &sp) ||
	    !int_in(PyTuple_GET_ITEM(t, 5), 0, 65535, &dp))
		return 0;
	Py_ssize_t alen = fam == 4 ? 4 : 16;
	const uint8_t *src, *dst;
	if (!bytes_of(PyTuple_GET_ITEM(t, 2), alen, &src) ||
	    !bytes_of(PyTuple_GET_ITEM(t, 3), alen, &dst))
		return 0;
	if (is_out) {
		if (fam != d->fam || proto != d->proto)
			return 0;
		d->osrc = src, d->odst = dst, d->osp = sp, d->odp = dp;
	} else {
		d->fam = fam, d->proto = proto;
		d->msrc = src, d->mdst = dst, d->msp = sp, d->mdp = dp;
	}
	return 1;
}

/* Read FlowDir ``fd`` into ``d``; 1 if it fits the common case, else 0. */
static int dir_of(PyObject *fd, struct dir *d)
{
	PyObject *v;
	long n;
	if (Py_TYPE(fd) != dir_type)
		return 0; /* None (unresolved) or a type bind() did not see */
	if (!(v = get(fd, off_dst_mac)) || !bytes_of(v, 6, &d->dmac))
		return 0;
	if (!(v = get(fd, off_src_mac)) || !bytes_of(v, 6, &d->smac))
		return 0;
	if (!(v = get(fd, off_out_ifindex)) || !int_in(v, 1, UINT32_MAX, &n))
		return 0;
	d->out_ifindex = (uint32_t)n;
	if (!(v = get(fd, off_in_ifindex)) || !int_in(v, 0, UINT32_MAX, &n))
		return 0;
	d->in_ifindex = (uint32_t)n;
	if (!(v = get(fd, off_mtu)) || !int_in(v, 0, 65535, &n))
		return 0;
	d->mtu = (uint16_t)n;
	if (!(v = get(fd, off_match)) || tuple_into(v, 0, d) != 1)
		return 0;
	return (v = get(fd, off_out)) != NULL && tuple_into(v, 1, d) == 1;
}

/* Sum of the native 16-bit words of ``len`` bytes (len even). */
static int64_t words(const uint8_t *p, int len)
{
	int64_t s = 0;
	for (int i = 0; i < len; i += 2) {
		uint16_t w;
		memcpy(&w, p + i, 2);
		s += w;
	}
	return s;
}

/* Python's x % 0xffff (never negative). */
static uint32_t mod_ffff(int64_t x)
{
	int64_t r = x % 0xFFFF;
	return (uint32_t)(r < 0 ? r + 0xFFFF : r);
}

/* Flags and both checksum deltas of one direction, as conn_entries_into
 * computes them (see bpf/ct_offload.h for what the deltas mean). */
static void dir_val(const struct dir *d, int alen, uint16_t ttl_word, uint32_t slot,
		    struct ct_flow_val *v)
{
	int s = memcmp(d->msrc, d->osrc, alen) != 0;
	int t = memcmp(d->mdst, d->odst, alen) != 0;
	int64_t a = 0;
	if (s)
		a += words(d->osrc, alen) - words(d->msrc, alen);
	if (t)
		a += words(d->odst, alen) - words(d->mdst, alen);
	uint16_t hmsp = htons((uint16_t)d->msp), hmdp = htons((uint16_t)d->mdp);
	uint16_t hosp = htons((uint16_t)d->osp), hodp = htons((uint16_t)d->odp);
	uint32_t flags, l4;
	if (d->proto == IPPROTO_ICMP_ || d->proto == IPPROTO_ICMPV6_) {
		/* One echo identifier: its change is charged to SNAT unless only
		 * the destination moves. */
		flags = (s ? CT_F_SNAT : 0) | (t ? CT_F_DNAT : 0);
		int64_t pd = 0;
		if (d->msp != d->osp) {
			if (!flags)
				flags = CT_F_SNAT;
			pd = (int64_t)hosp - hmsp;
		}
		l4 = mod_ffff(d->proto == IPPROTO_ICMP_ ? pd : a + pd);
	} else {
		flags = ((s || d->msp != d->osp) ? CT_F_SNAT : 0) |
			((t || d->mdp != d->odp) ? CT_F_DNAT : 0);
		l4 = flags ? mod_ffff(a + hosp - hmsp + hodp - hmdp) : 0;
	}
	memset(v, 0, offsetof(struct ct_flow_val, cnt));
	v->flags = flags;
	v->out_ifindex = d->out_ifindex;
	memcpy(v->smac, d->smac, 6);
	memcpy(v->dmac, d->dmac, 6);
	v->mtu = d->mtu;
	memcpy(v->nat_src, d->osrc, alen);
	memcpy(v->nat_dst, d->odst, alen);
	v->nat_sport = hosp;
	v->nat_dport = hodp;
	v->l3_csum_delta = d->fam == 4 ? mod_ffff(a - (int64_t)ttl_word) : 0;
	v->l4_csum_delta = l4;
	v->slot = slot;
}

/* The map key of direction ``d`` into ``out`` (KI_KMAX bytes); its length. */
static uint32_t dir_key_into(const struct dir *d, uint8_t *out)
{
	if (d->fam == 4) {
		struct ct_flow_key4 k;
		memset(&k, 0, sizeof(k));
		k.ifindex = d->in_ifindex;
		memcpy(&k.src, d->msrc, 4);
		memcpy(&k.dst, d->mdst, 4);
		k.sport = htons((uint16_t)d->msp);
		k.dport = htons((uint16_t)d->mdp);
		k.proto = (__u8)d->proto;
		memcpy(out, &k, sizeof(k));
		return sizeof(k);
	}
	struct ct_flow_key k;
	memset(&k, 0, sizeof(k));
	k.ifindex = d->in_ifindex;
	k.family = CT_FAMILY_V6;
	k.proto = (__u8)d->proto;
	k.sport = htons((uint16_t)d->msp);
	k.dport = htons((uint16_t)d->mdp);
	memcpy(k.src, d->msrc, 16);
	memcpy(k.dst, d->mdst, 16);
	memcpy(out, &k, sizeof(k));
	return sizeof(k);
}

_Static_assert(sizeof(struct ct_flow_key) <= KI_KMAX && sizeof(struct ct_flow_key4) <= KI_KMAX,
	       "KI_KMAX holds every map key");

/* --- KeyIndex: the key -> slot index (see _keyindex.h) ---------------------- */

typedef struct {
	PyObject_HEAD
	struct keyindex ki;
} KeyIndex;

static PyTypeObject KeyIndexType;

/* Python's keyed hash of the key bytes (siphash, randomised per process). */
static inline uint64_t key_hash(const void *k, uint32_t klen)
{
	return (uint64_t)_Py_HashBytes(k, (Py_ssize_t)klen);
}

static PyObject *ki_new(PyTypeObject *tp, PyObject *args, PyObject *kw)
{
	unsigned long n;
	static char *kwlist[] = {"nslots", NULL};
	if (!PyArg_ParseTupleAndKeywords(args, kw, "k", kwlist, &n))
		return NULL;
	if (n == 0 || n > KI_MAX_SLOTS) {
		PyErr_Format(PyExc_ValueError, "KeyIndex: nslots must be in 1..%u", KI_MAX_SLOTS);
		return NULL;
	}
	KeyIndex *self = (KeyIndex *)tp->tp_alloc(tp, 0);
	if (!self)
		return NULL;
	if (ki_init(&self->ki, (uint32_t)n) < 0) {
		Py_DECREF(self);
		return PyErr_SetFromErrno(PyExc_OSError);
	}
	return (PyObject *)self;
}

static void ki_dealloc(KeyIndex *self)
{
	ki_free(&self->ki);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A slot number argument into *slot; -1 with IndexError if out of range. */
static int slot_arg(KeyIndex *self, PyObject *o, uint32_t *slot)
{
	Py_ssize_t v = PyLong_AsSsize_t(o);
	if (v == -1 && PyErr_Occurred())
		return -1;
	if (v < 0 || v >= (Py_ssize_t)self->ki.nslots) {
		PyErr_Format(PyExc_IndexError, "KeyIndex: slot %zd out of range", v);
		return -1;
	}
	*slot = (uint32_t)v;
	return 0;
}

/* The key bytes of ``o`` (any C-contiguous buffer) into *pb; -1 with
 * ValueError if its length is not 1..KI_KMAX. Release pb when 0. */
static int key_arg(PyObject *o, Py_buffer *pb)
{
	if (PyObject_GetBuffer(o, pb, PyBUF_SIMPLE) < 0)
		return -1;
	if (pb->len < 1 || pb->len > KI_KMAX) {
		PyErr_Format(PyExc_ValueError, "KeyIndex: a key is 1..%d bytes, not %zd", KI_KMAX,
			     pb->len);
		PyBuffer_Release(pb);
		return -1;
	}
	return 0;
}

static PyObject *ki_py_find(KeyIndex *self, PyObject *key)
{
	Py_buffer kb;
	if (key_arg(key, &kb) < 0)
		return NULL;
	int64_t ref = ki_find(&self->ki, kb.buf, (uint32_t)kb.len, key_hash(kb.buf, (uint32_t)kb.len));
	PyBuffer_Release(&kb);
	return PyLong_FromLongLong(ref);
}

static PyObject *ki_py_keys(KeyIndex *self, PyObject *arg)
{
	uint32_t slot;
	if (slot_arg(self, arg, &slot) < 0)
		return NULL;
	const struct ki_rec *r = &self->ki.rec[slot];
	PyObject *t = PyTuple_New(r->nk);
	if (!t)
		return NULL;
	for (int d = 0; d < r->nk; d++) {
		PyObject *k = PyBytes_FromStringAndSize((const char *)r->k[d], r->klen);
		if (!k) {
			Py_DECREF(t);
			return NULL;
		}
		PyTuple_SET_ITEM(t, d, k);
	}
	return t;
}

/* Empty ``slot``'s record and take its keys out of the table. */
static void slot_drop(struct keyindex *ki, uint32_t slot)
{
	struct ki_rec *r = &ki->rec[slot];
	for (uint32_t d = 0; d < r->nk; d++)
		ki_remove(ki, 2 * slot + d, key_hash(r->k[d], r->klen));
	r->nk = 0;
}

/* ``slot`` now holds the ``nk`` keys of ``klen`` bytes at ``keys[d]``,
 * whose hashes are ``hs[d]``; the caller checked nobody else holds them. */
static void slot_set(struct keyindex *ki, uint32_t slot, uint32_t nk, uint32_t klen,
		     const uint8_t *const *keys, const uint64_t *hs)
{
	slot_drop(ki, slot);
	struct ki_rec *r = &ki->rec[slot];
	r->klen = (uint8_t)klen;
	for (uint32_t d = 0; d < nk; d++)
		memcpy(r->k[d], keys[d], klen);
	r->nk = (uint8_t)nk;
	for (uint32_t d = 0; d < nk; d++)
		ki_insert(ki, 2 * slot + d, hs[d]);
}

static PyObject *ki_py_put(KeyIndex *self, PyObject *args)
{
	PyObject *so, *seq;
	uint32_t slot;
	if (!PyArg_ParseTuple(args, "OO", &so, &seq) || slot_arg(self, so, &slot) < 0)
		return NULL;
	if (!PyTuple_Check(seq) && !PyList_Check(seq)) {
		PyErr_SetString(PyExc_TypeError, "KeyIndex.put: keys must be a tuple or a list");
		return NULL;
	}
	Py_ssize_t nk = PySequence_Fast_GET_SIZE(seq);
	if (nk > 2) {
		PyErr_SetString(PyExc_ValueError, "KeyIndex.put: at most two keys per slot");
		return NULL;
	}
	Py_buffer kb[2];
	const uint8_t *kp[2];
	uint64_t hs[2];
	Py_ssize_t got = 0;
	PyObject *res = NULL;
	for (; got < nk; got++) {
		if (key_arg(PySequence_Fast_GET_ITEM(seq, got), &kb[got]) < 0)
			goto out;
		kp[got] = kb[got].buf;
		hs[got] = key_hash(kb[got].buf, (uint32_t)kb[got].len);
	}
	if (nk == 2 && (kb[0].len != kb[1].len || memcmp(kp[0], kp[1], kb[0].len) == 0)) {
		PyErr_SetString(PyExc_ValueError,
				"KeyIndex.put: a slot's two keys are distinct and of one length");
		goto out;
	}
	for (Py_ssize_t d = 0; d < nk; d++) {
		int64_t ref = ki_find(&self->ki, kp[d], (uint32_t)kb[d].len, hs[d]);
		if (ref >= 0 && (uint32_t)(ref >> 1) != slot) {
			PyErr_Format(PyExc_ValueError, "KeyIndex.put: key %zd is held by slot %lld",
				     d, (long long)(ref >> 1));
			goto out;
		}
	}
	slot_set(&self->ki, slot, (uint32_t)nk, nk ? (uint32_t)kb[0].len : 0, kp, hs);
	res = Py_NewRef(Py_None);
out:
	for (Py_ssize_t d = 0; d < got; d++)
		PyBuffer_Release(&kb[d]);
	return res;
}

static PyObject *ki_py_drop(KeyIndex *self, PyObject *arg)
{
	uint32_t slot;
	if (slot_arg(self, arg, &slot) < 0)
		return NULL;
	slot_drop(&self->ki, slot);
	Py_RETURN_NONE;
}

static PyObject *ki_py_dir_of(KeyIndex *self, PyObject *const *args, Py_ssize_t nargs)
{
	uint32_t slot;
	if (nargs != 4) {
		PyErr_SetString(PyExc_TypeError, "KeyIndex.dir_of(slot, buf, off, klen)");
		return NULL;
	}
	if (slot_arg(self, args[0], &slot) < 0)
		return NULL;
	Py_ssize_t off = PyLong_AsSsize_t(args[2]), klen = PyLong_AsSsize_t(args[3]);
	if (PyErr_Occurred())
		return NULL;
	Py_buffer b;
	if (PyObject_GetBuffer(args[1], &b, PyBUF_SIMPLE) < 0)
		return NULL;
	long dir = -1;
	if (off < 0 || klen < 0 || off > b.len || klen > b.len - off) {
		PyBuffer_Release(&b);
		PyErr_SetString(PyExc_IndexError, "KeyIndex.dir_of: key outside the buffer");
		return NULL;
	}
	const struct ki_rec *r = &self->ki.rec[slot];
	if (r->klen == klen)
		for (int d = 0; d < r->nk && dir < 0; d++)
			if (memcmp(r->k[d], (const char *)b.buf + off, (size_t)klen) == 0)
				dir = d;
	PyBuffer_Release(&b);
	return PyLong_FromLong(dir);
}

static PyObject *ki_py_clear(KeyIndex *self, PyObject *unused)
{
	(void)unused;
	ki_clear(&self->ki);
	Py_RETURN_NONE;
}

static Py_ssize_t ki_len(KeyIndex *self)
{
	return (Py_ssize_t)self->ki.nkeys;
}

static PyObject *ki_get_nslots(KeyIndex *self, void *closure)
{
	(void)closure;
	return PyLong_FromUnsignedLong(self->ki.nslots);
}

static PyObject *ki_get_nbytes(KeyIndex *self, void *closure)
{
	(void)closure;
	return PyLong_FromSize_t(self->ki.rec_len + self->ki.tab_len);
}

static PyMethodDef ki_methods[] = {
	{"find", (PyCFunction)ki_py_find, METH_O, "find(key) -> 2 * slot + dir holding key, or -1."},
	{"keys", (PyCFunction)ki_py_keys, METH_O, "keys(slot) -> the slot's keys (a tuple)."},
	{"put", (PyCFunction)ki_py_put, METH_VARARGS, "put(slot, keys): the slot holds keys now."},
	{"drop", (PyCFunction)ki_py_drop, METH_O, "drop(slot): the slot holds no key."},
	{"dir_of", (PyCFunction)(void (*)(void))ki_py_dir_of, METH_FASTCALL,
	 "dir_of(slot, buf, off, klen) -> dir of the slot's key buf[off:off+klen], or -1."},
	{"clear", (PyCFunction)ki_py_clear, METH_NOARGS, "Every slot empty."},
	{NULL, NULL, 0, NULL},
};

static PyGetSetDef ki_getset[] = {
	{"nslots", (getter)ki_get_nslots, NULL, "slots", NULL},
	{"nbytes", (getter)ki_get_nbytes, NULL, "memory mapped for the index", NULL},
	{NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods ki_as_seq = {.sq_length = (lenfunc)ki_len};

static PyTypeObject KeyIndexType = {
	PyVarObject_HEAD_INIT(NULL, 0).tp_name = "_fastadd.KeyIndex",
	.tp_basicsize = sizeof(KeyIndex),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "The key -> slot index in memory taken at construction (ctxdp.providers.keyindex).",
	.tp_new = ki_new,
	.tp_dealloc = (destructor)ki_dealloc,
	.tp_methods = ki_methods,
	.tp_getset = ki_getset,
	.tp_as_sequence = &ki_as_seq,
};

/* --- add_new ------------------------------------------------------------------ */

/* The pending-run state of one family, borrowed from its _Pending. */
struct pend {
	PyObject *written, *kbuf, *vbuf;
};

static int pend_of(PyObject *p, struct pend *out)
{
	out->written = PyObject_GetAttr(p, s_written);
	out->kbuf = PyObject_GetAttr(p, s_kbuf);
	out->vbuf = PyObject_GetAttr(p, s_vbuf);
	if (!out->written || !out->kbuf || !out->vbuf)
		return -1;
	if (!PyList_CheckExact(out->written) || !PyByteArray_CheckExact(out->kbuf) ||
	    !PyByteArray_CheckExact(out->vbuf)) {
		PyErr_SetString(PyExc_TypeError, "_Pending must hold a list and two bytearrays");
		return -1;
	}
	return 0;
}

static void pend_drop(struct pend *p)
{
	Py_CLEAR(p->written);
	Py_CLEAR(p->kbuf);
	Py_CLEAR(p->vbuf);
}

/* A new held_type instance for a connection (new reference). */
static PyObject *held_new(PyObject *slot, PyObject *ctx, PyObject *gen)
{
	PyObject *h = held_type->tp_alloc(held_type, 0);
	if (!h)
		return NULL;
	put(h, off_h_slot, slot);
	put(h, off_h_ctx, ctx);
	put(h, off_h_gen, gen);
	return h;
}

/* Outcome of one op: 1 handled, 0 left to Python, -1 error (nothing of the
 * op changed in either case but 1). */
static int one(PyObject *op, struct pend *pends, struct keyindex *ki, PyObject *free_list,
	       Py_ssize_t *nfree, uint64_t *lu, Py_ssize_t lu_len, PyObject *by_slot,
	       PyObject *gen, Py_ssize_t priv_idx, Py_ssize_t vs, uint16_t ttl_word)
{
	struct dir d0, d1;

	if (*nfree == 0 || Py_TYPE(op) != op_type)
		return 0;
	PyObject *ctx = get(op, off_op_ctx);
	if (!ctx || Py_TYPE(ctx) != ctx_type)
		return 0;
	PyObject *priv = get(ctx, off_ctx_priv), *dirs = get(ctx, off_ctx_dirs);
	if (!priv || !PyList_CheckExact(priv) || PyList_GET_SIZE(priv) <= priv_idx || !dirs ||
	    !PyList_CheckExact(dirs) || PyList_GET_SIZE(dirs) != 2)
		return 0;
	if (PyList_GET_ITEM(priv, priv_idx) != Py_None)
		return 0; /* held already: a rewrite or a duplicate */
	if (!dir_of(PyList_GET_ITEM(dirs, 0), &d0) || !dir_of(PyList_GET_ITEM(dirs, 1), &d1))
		return 0;
	if (d0.fam != d1.fam || d0.proto != d1.proto)
		return 0;
	/* The slot's int object comes from the pool and goes back to it on
	 * release: installing a connection allocates no int. */
	PyObject *slot_obj = PyList_GET_ITEM(free_list, *nfree - 1); /* borrowed */
	long sv;
	if (!int_in(slot_obj, 0, UINT32_MAX, &sv) || sv >= lu_len ||
	    sv >= PyList_GET_SIZE(by_slot) || (uint64_t)sv >= ki->nslots)
		return 0;
	uint32_t slot = (uint32_t)sv;
	struct pend *p = &pends[d0.fam == 4 ? 0 : 1];
	uint8_t kb[2][KI_KMAX];
	uint32_t klen = dir_key_into(&d0, kb[0]);
	dir_key_into(&d1, kb[1]);
	if (memcmp(kb[0], kb[1], klen) == 0)
		return 0; /* one key for both directions: Python refuses it */
	Py_ssize_t n = PyList_GET_SIZE(p->written);
	Py_ssize_t voff = n * 2 * vs, koff = n * 2 * (Py_ssize_t)klen;
	if (voff + 2 * vs > PyByteArray_GET_SIZE(p->vbuf) ||
	    koff + 2 * (Py_ssize_t)klen > PyByteArray_GET_SIZE(p->kbuf))
		return 0; /* the caller sized both for the run: never happens */
	uint64_t hs[2] = {key_hash(kb[0], klen), key_hash(kb[1], klen)};
	if (ki_find(ki, kb[0], klen, hs[0]) >= 0 || ki_find(ki, kb[1], klen, hs[1]) >= 0)
		return 0; /* a key someone holds: Python decides (claim, EEXIST...) */
	/* The two steps that can fail come first; after them nothing can. */
	PyObject *h = held_new(slot_obj, ctx, gen);
	if (!h)
		return -1;
	if (PyList_Append(p->written, op) < 0) {
		Py_DECREF(h);
		return -1;
	}
	const uint8_t *kp[2] = {kb[0], kb[1]};
	slot_set(ki, slot, 2, klen, kp, hs);
	char *kdst = PyByteArray_AS_STRING(p->kbuf) + koff;
	memcpy(kdst, kb[0], klen);
	memcpy(kdst + klen, kb[1], klen);
	char *vb = PyByteArray_AS_STRING(p->vbuf) + voff;
	memset(vb, 0, 2 * vs);
	int alen = d0.fam == 4 ? 4 : 16;
	dir_val(&d0, alen, ttl_word, slot, (struct ct_flow_val *)vb);
	dir_val(&d1, alen, ttl_word, slot, (struct ct_flow_val *)(vb + vs));
	lu[slot] = 0; /* a new connection was never seen */
	/* In range (checked above), so these two cannot fail; each steals. */
	Py_INCREF(h);
	PyList_SetItem(by_slot, slot, h);
	PyList_SetItem(priv, priv_idx, h);
	put(op, off_op_err, zero);
	(*nfree)--;
	return 1;
}

static PyObject *add_new(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
	(void)self;
	if (nargs != 13) {
		PyErr_SetString(PyExc_TypeError, "add_new takes 13 arguments");
		return NULL;
	}
	if (!held_type) {
		PyErr_SetString(PyExc_RuntimeError, "add_new: bind() first");
		return NULL;
	}
	PyObject *run = args[0], *index = args[5], *by_slot = args[9];
	PyObject *gen = args[10];
	Py_ssize_t i = PyLong_AsSsize_t(args[1]), stop = PyLong_AsSsize_t(args[2]);
	Py_ssize_t priv_idx = PyLong_AsSsize_t(args[11]);
	Py_ssize_t used = PyLong_AsSsize_t(args[7]), vs = PyLong_AsSsize_t(args[12]);
	if (PyErr_Occurred())
		return NULL;
	PyObject *free_list = args[6];
	if (!PyList_CheckExact(run) || Py_TYPE(index) != &KeyIndexType ||
	    !PyList_CheckExact(by_slot) || !PyList_CheckExact(free_list)) {
		PyErr_SetString(PyExc_TypeError,
				"add_new: run/free/by_slot must be lists, index a KeyIndex");
		return NULL;
	}
	if (vs < (Py_ssize_t)offsetof(struct ct_flow_val, cnt) || stop > PyList_GET_SIZE(run) ||
	    i < 0 || used < 0 || priv_idx < 0) {
		PyErr_SetString(PyExc_ValueError, "add_new: bad index or value size");
		return NULL;
	}
	struct pend pends[2] = {{0}};
	Py_buffer lb = {0};
	PyObject *res = NULL;
	Py_ssize_t new = 0;
	if (pend_of(args[3], &pends[0]) < 0 || pend_of(args[4], &pends[1]) < 0)
		goto out;
	/* ``lu`` is the writable memoryview ('Q') over the mmap'ed
	 * ct_last_used, written in place. */
	if (PyObject_GetBuffer(args[8], &lb, PyBUF_WRITABLE) < 0)
		goto out;
	Py_ssize_t nfree = PyList_GET_SIZE(free_list) - used;
	if (nfree < 0) {
		PyErr_SetString(PyExc_ValueError, "add_new: used > len(free)");
		goto out;
	}
	uint16_t ttl_word; /* the TTL/protocol word drops by bytes [1, 0] */
	memcpy(&ttl_word, "\x01\x00", 2);
	struct keyindex *ki = &((KeyIndex *)index)->ki;
	for (; i < stop; i++) {
		int r = one(PyList_GET_ITEM(run, i), pends, ki, free_list, &nfree,
			    (uint64_t *)lb.buf, lb.len / 8, by_slot, gen, priv_idx, vs, ttl_word);
		if (r < 0)
			goto out;
		if (r == 0)
			break;
		new++;
	}
	res = Py_BuildValue("(nn)", i, new);
out:
	if (lb.obj)
		PyBuffer_Release(&lb);
	pend_drop(&pends[0]);
	pend_drop(&pends[1]);
	return res;
}

/* The offset of object slot ``name`` of ``tp``; -1 with an exception if it
 * is not a plain object slot (a __slots__ entry or slots=True field). */
static Py_ssize_t slot_offset(PyTypeObject *tp, const char *name)
{
	PyObject *d = PyDict_GetItemString(tp->tp_dict, name); /* borrowed */
	if (!d || Py_TYPE(d) != &PyMemberDescr_Type ||
	    ((PyMemberDescrObject *)d)->d_member->type != T_OBJECT_EX) {
		PyErr_Format(PyExc_TypeError, "%s.%s is not a __slots__ field", tp->tp_name, name);
		return -1;
	}
	return ((PyMemberDescrObject *)d)->d_member->offset;
}

static PyObject *bind_types(PyObject *self, PyObject *args)
{
	(void)self;
	PyTypeObject *t[4];
	if (!PyArg_ParseTuple(args, "O!O!O!O!", &PyType_Type, &t[0], &PyType_Type, &t[1],
			      &PyType_Type, &t[2], &PyType_Type, &t[3]))
		return NULL;
	struct {
		Py_ssize_t *off;
		int type;
		const char *name;
	} fields[] = {
		{&off_op_ctx, 0, "ctx"},          {&off_op_err, 0, "err"},
		{&off_ctx_priv, 1, "priv"},       {&off_ctx_dirs, 1, "dirs"},
		{&off_in_ifindex, 2, "in_ifindex"}, {&off_match, 2, "match"},
		{&off_out, 2, "out"},             {&off_out_ifindex, 2, "out_ifindex"},
		{&off_src_mac, 2, "src_mac"},     {&off_dst_mac, 2, "dst_mac"},
		{&off_mtu, 2, "mtu"},             {&off_h_slot, 3, "slot"},
		{&off_h_ctx, 3, "ctx"},           {&off_h_gen, 3, "gen"},
	};
	for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++)
		if ((*fields[i].off = slot_offset(t[fields[i].type], fields[i].name)) < 0)
			return NULL;
	PyTypeObject **bound[4] = {&op_type, &ctx_type, &dir_type, &held_type};
	for (int i = 0; i < 4; i++) {
		Py_INCREF(t[i]);
		Py_XSETREF(*bound[i], t[i]);
	}
	Py_RETURN_NONE;
}


/* --- Writer: BPF_MAP_UPDATE_BATCH in a native thread ----------------------- */

#define WJOBS 256 /* jobs submitted and not yet waited for, at most */
/* How long each side polls before it sleeps on a condition variable. Waking
 * a thread that sleeps costs up to ~400 us on this project's test VMs (an
 * IPI to a halted vCPU; measured), as long as writing 400 connections
 * takes. Within an ADD run the next chunk comes sooner than this, so no
 * one sleeps; between runs the thread does, and wake() at the start of a
 * run hides its wake-up behind the packing of the first chunk. */
#define WSPIN_NS 500000

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#else
#define cpu_relax() __asm__ __volatile__("" ::: "memory")
#endif

struct wjob {
	Py_buffer k, v;
	int fd;
	uint32_t count;
	uint32_t done; /* entries applied */
	int err;       /* 0, or the errno of entry ``done`` */
};

/* head, ran and the two sleeping flags are shared: __atomic (seq_cst), so
 * "publish, then check whether the other side sleeps" can never miss a
 * wake-up (each side sets its flag under ``mu`` before it re-checks). */
typedef struct {
	PyObject_HEAD
	pthread_mutex_t mu;
	pthread_cond_t work, fin;
	pthread_t th;
	int started, stopping;
	pid_t pid;      /* the process the thread runs in (see writer_forked) */
	uint64_t head;  /* jobs submitted (written by the caller) */
	uint64_t ran;   /* jobs finished (written by the thread) */
	int wsleep;     /* the thread sleeps on ``work`` */
	int msleep;     /* a caller sleeps on ``fin`` */
	int kick;       /* wake(): leave ``work`` and poll again (under ``mu``) */
	struct wjob jobs[WJOBS];
} Writer;

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

#define LOAD(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)

/* Poll until *p != v for up to WSPIN_NS; 1 if it changed. */
static int spin_while_eq(uint64_t *p, uint64_t v, const int *stop)
{
	uint64_t t0 = now_ns();
	for (unsigned i = 0;; i++) {
		if (LOAD(p) != v || (stop && LOAD(stop)))
			return 1;
		if ((i & 63) == 63 && now_ns() - t0 > WSPIN_NS)
			return 0;
		cpu_relax();
	}
}

/* One update-batch over a whole job; sets done/err (no Python here). */
static void wjob_run(struct wjob *j)
{
	union bpf_attr a;
	memset(&a, 0, sizeof(a));
	a.batch.keys = (uint64_t)(uintptr_t)j->k.buf;
	a.batch.values = (uint64_t)(uintptr_t)j->v.buf;
	a.batch.count = j->count;
	a.batch.map_fd = (uint32_t)j->fd;
	if (syscall(__NR_bpf, BPF_MAP_UPDATE_BATCH, &a, sizeof(a)) == 0) {
		j->done = j->count, j->err = 0;
		return;
	}
	j->err = errno ? errno : EIO;
	/* The kernel writes the count back once it started on the entries; a
	 * refusal up front leaves ours (see bpfsys._done). */
	j->done = a.batch.count < j->count ? a.batch.count : 0;
}

static void *writer_main(void *arg)
{
	Writer *w = arg;
	uint64_t tail = 0;
	for (;;) {
		if (LOAD(&w->head) == tail) {
			if (LOAD(&w->stopping))
				break; /* and every job ran */
			if (spin_while_eq(&w->head, tail, &w->stopping))
				continue;
			pthread_mutex_lock(&w->mu);
			STORE(&w->wsleep, 1);
			while (LOAD(&w->head) == tail && !LOAD(&w->stopping) && !w->kick)
				pthread_cond_wait(&w->work, &w->mu);
			w->kick = 0;
			STORE(&w->wsleep, 0);
			pthread_mutex_unlock(&w->mu);
			continue; /* woken with no job (wake()): poll again */
		}
		wjob_run(&w->jobs[tail % WJOBS]);
		STORE(&w->ran, ++tail);
		if (LOAD(&w->msleep)) {
			pthread_mutex_lock(&w->mu);
			pthread_cond_broadcast(&w->fin);
			pthread_mutex_unlock(&w->mu);
		}
	}
	return NULL;
}

static PyObject *writer_new(PyTypeObject *tp, PyObject *args, PyObject *kw)
{
	(void)args, (void)kw;
	Writer *w = (Writer *)tp->tp_alloc(tp, 0);
	if (!w)
		return NULL;
	pthread_mutex_init(&w->mu, NULL);
	pthread_cond_init(&w->work, NULL);
	pthread_cond_init(&w->fin, NULL);
	return (PyObject *)w;
}

/* After fork() the child has this object but not the thread: forget the
 * parent's queue (its buffers are the child's copies) so that the next
 * submit starts a thread of the child's own instead of waiting forever. */
static void writer_forked(Writer *w)
{
	if (!w->started || w->pid == getpid())
		return;
	for (int i = 0; i < WJOBS; i++) {
		if (w->jobs[i].k.obj)
			PyBuffer_Release(&w->jobs[i].k);
		if (w->jobs[i].v.obj)
			PyBuffer_Release(&w->jobs[i].v);
	}
	pthread_mutex_init(&w->mu, NULL);
	pthread_cond_init(&w->work, NULL);
	pthread_cond_init(&w->fin, NULL);
	w->started = w->stopping = w->wsleep = w->msleep = w->kick = 0;
	w->head = w->ran = 0;
}

/* Wait (GIL released) until every submitted job ran, end the thread, then
 * release the buffers of jobs nobody waited for. */
static void writer_stop(Writer *w)
{
	writer_forked(w);
	if (w->started) {
		Py_BEGIN_ALLOW_THREADS
		pthread_mutex_lock(&w->mu);
		STORE(&w->stopping, 1);
		pthread_cond_signal(&w->work);
		pthread_mutex_unlock(&w->mu);
		pthread_join(w->th, NULL);
		Py_END_ALLOW_THREADS
		w->started = 0;
		w->stopping = 0;
	}
	for (int i = 0; i < WJOBS; i++) {
		if (w->jobs[i].k.obj)
			PyBuffer_Release(&w->jobs[i].k);
		if (w->jobs[i].v.obj)
			PyBuffer_Release(&w->jobs[i].v);
	}
}

static void writer_dealloc(Writer *w)
{
	writer_stop(w);
	pthread_mutex_destroy(&w->mu);
	pthread_cond_destroy(&w->work);
	pthread_cond_destroy(&w->fin);
	Py_TYPE(w)->tp_free((PyObject *)w);
}

static int writer_start(Writer *w)
{
	writer_forked(w);
	if (!w->started) {
		if ((errno = pthread_create(&w->th, NULL, writer_main, w)) != 0) {
			PyErr_SetFromErrno(PyExc_OSError);
			return -1;
		}
		w->started = 1;
		w->pid = getpid();
	}
	return 0;
}

/* Get a sleeping thread polling again: a caller about to pack a chunk calls
 * this first, so the wake-up latency passes while it packs. */
static PyObject *writer_wake(Writer *w, PyObject *unused)
{
	(void)unused;
	if (writer_start(w) < 0)
		return NULL;
	if (LOAD(&w->wsleep)) {
		pthread_mutex_lock(&w->mu);
		w->kick = 1;
		pthread_cond_signal(&w->work);
		pthread_mutex_unlock(&w->mu);
	}
	Py_RETURN_NONE;
}

static PyObject *writer_submit(Writer *w, PyObject *args)
{
	int fd;
	unsigned int count;
	PyObject *ko, *vo;
	if (!PyArg_ParseTuple(args, "iOOI", &fd, &ko, &vo, &count) || writer_start(w) < 0)
		return NULL;
	/* A ring entry is free once the job that used it was waited for (its
	 * buffers released): the caller keeps fewer than WJOBS outstanding. */
	uint64_t id = w->head;
	struct wjob *j = &w->jobs[id % WJOBS];
	if (j->k.obj || j->v.obj) {
		PyErr_SetString(PyExc_RuntimeError, "Writer: more than 256 jobs not waited for");
		return NULL;
	}
	if (PyObject_GetBuffer(ko, &j->k, PyBUF_SIMPLE) < 0)
		return NULL;
	if (PyObject_GetBuffer(vo, &j->v, PyBUF_SIMPLE) < 0) {
		PyBuffer_Release(&j->k);
		return NULL;
	}
	j->fd = fd, j->count = count, j->done = 0, j->err = 0;
	STORE(&w->head, id + 1);
	if (LOAD(&w->wsleep)) {
		pthread_mutex_lock(&w->mu);
		pthread_cond_signal(&w->work);
		pthread_mutex_unlock(&w->mu);
	}
	return PyLong_FromUnsignedLongLong(id);
}

static PyObject *writer_wait(Writer *w, PyObject *arg)
{
	unsigned long long id = PyLong_AsUnsignedLongLong(arg);
	if (PyErr_Occurred())
		return NULL;
	writer_forked(w);
	struct wjob *j = &w->jobs[id % WJOBS];
	if (id >= w->head || !j->k.obj) {
		PyErr_SetString(PyExc_ValueError, "Writer.wait: no such job");
		return NULL;
	}
	if (LOAD(&w->ran) <= id) {
		Py_BEGIN_ALLOW_THREADS
		uint64_t r;
		while ((r = LOAD(&w->ran)) <= id && !spin_while_eq(&w->ran, r, NULL)) {
			pthread_mutex_lock(&w->mu);
			STORE(&w->msleep, 1);
			while (LOAD(&w->ran) == r)
				pthread_cond_wait(&w->fin, &w->mu);
			STORE(&w->msleep, 0);
			pthread_mutex_unlock(&w->mu);
		}
		Py_END_ALLOW_THREADS
	}
	PyBuffer_Release(&j->k);
	PyBuffer_Release(&j->v);
	return Py_BuildValue("(Ii)", j->done, j->err);
}

static PyObject *writer_close(Writer *w, PyObject *unused)
{
	(void)unused;
	writer_stop(w);
	Py_RETURN_NONE;
}

static PyMethodDef writer_methods[] = {
	{"submit", (PyCFunction)writer_submit, METH_VARARGS,
	 "submit(fd, keys, values, count) -> job: queue one update-batch."},
	{"wait", (PyCFunction)writer_wait, METH_O,
	 "wait(job) -> (done, errno): block until the job ran."},
	{"wake", (PyCFunction)writer_wake, METH_NOARGS,
	 "Get the thread polling for jobs again (it sleeps after a while)."},
	{"close", (PyCFunction)writer_close, METH_NOARGS,
	 "Wait for every queued job and end the thread."},
	{NULL, NULL, 0, NULL},
};

static PyTypeObject WriterType = {
	PyVarObject_HEAD_INIT(NULL, 0).tp_name = "_fastadd.Writer",
	.tp_basicsize = sizeof(Writer),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "A native thread running BPF_MAP_UPDATE_BATCH (see the module contract).",
	.tp_new = writer_new,
	.tp_dealloc = (destructor)writer_dealloc,
	.tp_methods = writer_methods,
};

static PyMethodDef methods[] = {
	{"bind", bind_types, METH_VARARGS, "Bind the slotted classes add_new works on."},
	{"add_new", (PyCFunction)(void (*)(void))add_new, METH_FASTCALL,
	 "Install the common-case ADDs of a run; see the module contract."},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_fastadd",
	"The compiled common case of XdpProvider._add_run (see _fastadd.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__fastadd(void)
{
	if (!(s_written = PyUnicode_InternFromString("written")) ||
	    !(s_kbuf = PyUnicode_InternFromString("kbuf")) ||
	    !(s_vbuf = PyUnicode_InternFromString("vbuf")) || !(zero = PyLong_FromLong(0)))
		return NULL;
	if (PyType_Ready(&WriterType) < 0 || PyType_Ready(&KeyIndexType) < 0)
		return NULL;
	PyObject *m = PyModule_Create(&module);
	if (!m)
		return NULL;
	if (PyModule_AddObjectRef(m, "Writer", (PyObject *)&WriterType) < 0 ||
	    PyModule_AddObjectRef(m, "KeyIndex", (PyObject *)&KeyIndexType) < 0) {
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
