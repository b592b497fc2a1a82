/* Fused DAC and ADC kernels for device_sim's rewritten graphs, as onnxruntime custom ops.
 *
 * DacCodes(x) -> rint(x * (levels / s[r])) [* (s[r] / levels) with codes=0], s
 *     s[r] = max(max |x| over vector r, tiny): a vector is a sample (layout=0, Conv) or a row of
 *     the last axis (layout=1); a NaN in it makes s[r] NaN
 * AdcOutput(y, s, w_max_step, scale[, bias, bank, start, residual]) ->
 *     rint(clip(y [* per_unit] [+ bank[(start + i) mod len(bank)]], -limit, limit)) * unit_out
 *     [+ bias[c]] [+ residual[i]], then max(., 0) with relu=1; per vector r, unit = s[r] * w_max_step,
 *     unit_out = unit * scale, and with gained=0 per_unit = 1 / unit (else y is in ADC steps)
 *
 * Each replaces the chain of onnxruntime nodes that device_sim/graph.py otherwise writes
 * (ReduceMax, ReduceMin, Max, Div, Mul, Round[, Mul]; [Mul,] Add, Clip, Round, Mul, Add[, Relu])
 * with one pass over the tensor (the DAC reads each vector twice, the second time from cache),
 * doing the same float32 operations in the same order (no FMA contraction: build with
 * -ffp-contract=off), so the outputs are the same. x/y are viewed as R vectors (one per value of
 * s); AdcOutput's channel c is axis 1 (layout=0, Conv) or the last axis
 * (layout=1, Gemm/MatMul).
 *
 * The onnxruntime C API is used through its function table (OrtApi, asked for at API version 17;
 * the table is append-only, so newer runtimes keep these slots). Only the slots below are called.
 * The kernels' threads are the session's own intra-op pool (KernelContext_ParallelFor).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define LE_OP_VERSION 13u  /* the OrtCustomOp layout below */
#define LE_API_VERSION 17u /* the function table asked for: the slots below all exist in it */

typedef struct OrtStatus OrtStatus;
typedef OrtStatus *(*CreateStatusFn)(int, const char *);
typedef const void *Fn; /* one slot of the OrtApi function table */

enum {
  SLOT_CreateStatus = 0,
  SLOT_CreateCustomOpDomain = 26,
  SLOT_CustomOpDomain_Add = 27,
  SLOT_AddCustomOpDomain = 28,
  SLOT_GetTensorMutableData = 51,
  SLOT_GetTensorElementType = 60,
  SLOT_GetDimensionsCount = 61,
  SLOT_GetDimensions = 62,
  SLOT_GetTensorShapeElementCount = 64,
  SLOT_GetTensorTypeAndShape = 65,
  SLOT_KernelInfoGetAttribute_float = 85,
  SLOT_KernelInfoGetAttribute_int64 = 86,
  SLOT_KernelContext_GetInputCount = 88,
  SLOT_KernelContext_GetInput = 90,
  SLOT_KernelContext_GetOutput = 91,
  SLOT_ReleaseStatus = 93,
  SLOT_ReleaseTensorTypeAndShapeInfo = 99,
  SLOT_KernelContext_ParallelFor = 274, /* API version 17 (onnxruntime 1.17) */
};

typedef struct {
  const Fn *(*GetApi)(uint32_t version);
  const char *(*GetVersionString)(void);
} ApiBase;

enum { TYPE_FLOAT = 1, TYPE_INT64 = 7 };
enum { REQUIRED = 0, OPTIONAL = 1 };

/* onnxruntime's OrtCustomOp, version 13 layout */
typedef struct CustomOp {
  uint32_t version;
  void *(*CreateKernel)(const struct CustomOp *op, const Fn *api, const void *info);
  const char *(*GetName)(const struct CustomOp *op);
  const char *(*GetExecutionProviderType)(const struct CustomOp *op);
  int (*GetInputType)(const struct CustomOp *op, size_t index);
  size_t (*GetInputTypeCount)(const struct CustomOp *op);
  int (*GetOutputType)(const struct CustomOp *op, size_t index);
  size_t (*GetOutputTypeCount)(const struct CustomOp *op);
  void (*KernelCompute)(void *kernel, void *context);
  void (*KernelDestroy)(void *kernel);
  int (*GetInputCharacteristic)(const struct CustomOp *op, size_t index);
  int (*GetOutputCharacteristic)(const struct CustomOp *op, size_t index);
  int (*GetInputMemoryType)(const struct CustomOp *op, size_t index);
} CustomOp;

#define CALL(api, slot, type, ...) (((type)(api)[SLOT_##slot])(__VA_ARGS__))

typedef OrtStatus *(*GetInputFn)(void *, size_t, const void **);
typedef OrtStatus *(*GetInputCountFn)(void *, size_t *);
typedef OrtStatus *(*GetOutputFn)(void *, size_t, const int64_t *, size_t, void **);
typedef OrtStatus *(*MutableDataFn)(const void *, void **);
typedef OrtStatus *(*TypeAndShapeFn)(const void *, void **);
typedef OrtStatus *(*ElementCountFn)(const void *, size_t *);
typedef OrtStatus *(*DimsCountFn)(const void *, size_t *);
typedef OrtStatus *(*DimsFn)(const void *, int64_t *, size_t);
typedef void (*ReleaseFn)(void *);
typedef OrtStatus *(*AttrFloatFn)(const void *, const char *, float *);
typedef OrtStatus *(*AttrInt64Fn)(const void *, const char *, int64_t *);

typedef struct {
  const Fn *api;
  float limit, levels, tiny;
  int64_t layout, relu, threads, codes, gained;
} Kernel;

typedef struct {
  const void *value; /* NULL: input absent */
  void *data;
  size_t count;
  int64_t dims[8];
  size_t ndims;
} Tensor;

/* Reads input `index` (absent, or beyond the node's inputs: value NULL). Returns 0 on failure. */
static int get_input(const Fn *api, void *ctx, size_t index, Tensor *t) {
  size_t n = 0;
  memset(t, 0, sizeof *t);
  if (CALL(api, KernelContext_GetInputCount, GetInputCountFn, ctx, &n) || index >= n) return 1;
  if (CALL(api, KernelContext_GetInput, GetInputFn, ctx, index, &t->value)) return 0;
  if (t->value == NULL) return 1;
  void *info = NULL;
  if (CALL(api, GetTensorTypeAndShape, TypeAndShapeFn, t->value, &info)) return 0;
  int ok = !CALL(api, GetTensorShapeElementCount, ElementCountFn, info, &t->count) &&
           !CALL(api, GetDimensionsCount, DimsCountFn, info, &t->ndims) && t->ndims <= 8 &&
           !CALL(api, GetDimensions, DimsFn, info, t->dims, t->ndims);
  CALL(api, ReleaseTensorTypeAndShapeInfo, ReleaseFn, info);
  return ok && !CALL(api, GetTensorMutableData, MutableDataFn, t->value, &t->data);
}

static float *get_output(const Fn *api, void *ctx, size_t index, const int64_t *dims,
                         size_t ndims) {
  void *value = NULL, *data = NULL;
  if (CALL(api, KernelContext_GetOutput, GetOutputFn, ctx, index, dims, ndims, &value))
    return NULL;
  if (CALL(api, GetTensorMutableData, MutableDataFn, value, &data)) return NULL;
  return (float *)data;
}

/* ---- work split over onnxruntime's intra-op thread pool ---- */

typedef void (*RangeFn)(const void *args, size_t lo, size_t hi);
typedef void (*PartFn)(void *split, size_t part);
typedef OrtStatus *(*ParallelForFn)(const void *, PartFn, size_t, size_t, void *);

#define MAX_PARTS 256
#define MIN_ITEMS_PER_PART 16384 /* elements: below this a part costs more than it saves */

typedef struct {
  RangeFn fn;
  const void *args;
  size_t items, parts;
} Split;

static void run_part(void *p, size_t part) {
  const Split *s = (const Split *)p;
  s->fn(s->args, s->items * part / s->parts, s->items * (part + 1) / s->parts);
}

/* fn over [0, items) in up to `threads` contiguous parts (0: one per core), run by the session's
   own thread pool (KernelContext_ParallelFor), so that no second set of threads competes with
   onnxruntime's for the cores. */
static void parallel(const Fn *api, void *ctx, RangeFn fn, const void *args, size_t items,
                     size_t per_item, int64_t threads) {
  size_t t = threads > 0 ? (size_t)threads : (size_t)sysconf(_SC_NPROCESSORS_ONLN);
  size_t by_size = items * per_item / MIN_ITEMS_PER_PART;
  if (t > by_size) t = by_size;
  if (t > items) t = items;
  if (t > MAX_PARTS) t = MAX_PARTS;
  if (t <= 1) {
    fn(args, 0, items);
    return;
  }
  Split split = {fn, args, items, t};
  OrtStatus *s = CALL(api, KernelContext_ParallelFor, ParallelForFn, ctx, run_part, t, 0, &split);
  if (s != NULL) { /* no pool: do it all here (parts already done are rewritten alike) */
    CALL(api, ReleaseStatus, ReleaseFn, s);
    fn(args, 0, items);
  }
}

/* ---- DacCodes ---- */

typedef struct {
  const float *x;
  float *out, *range;
  size_t k; /* elements per vector */
  float levels, tiny;
  int codes;
} DacArgs;

static void dac_range(const void *p, size_t lo, size_t hi) {
  const DacArgs *a = (const DacArgs *)p;
  for (size_t r = lo; r < hi; r++) {
    const float *x = a->x + r * a->k;
    float *out = a->out + r * a->k;
    /* max |x| as the largest bit pattern of |x| (the order of non-negative floats; a NaN's is
       above +inf's): an integer reduction, which vectorizes */
    uint32_t top = 0;
    for (size_t i = 0; i < a->k; i++) {
      uint32_t bits;
      memcpy(&bits, &x[i], sizeof bits);
      bits &= 0x7fffffffu;
      top = bits > top ? bits : top;
    }
    float m;
    memcpy(&m, &top, sizeof m);
    m = top > 0x7f800000u ? NAN : (m > a->tiny ? m : a->tiny);
    a->range[r] = m;
    const float to_int = a->levels / m;
    if (a->codes) {
      for (size_t i = 0; i < a->k; i++) {
        float v = x[i] * to_int;
        out[i] = rintf(v);
      }
    } else {
      const float to_x = m / a->levels;
      for (size_t i = 0; i < a->k; i++) {
        float v = x[i] * to_int;
        out[i] = rintf(v) * to_x;
      }
    }
  }
}

/* outputs: the codes (or the quantised x) and the range s, shaped as x with the reduced axes 1 */
static void dac_compute(void *kernel, void *ctx) {
  const Kernel *kr = (const Kernel *)kernel;
  Tensor x;
  if (!get_input(kr->api, ctx, 0, &x) || x.value == NULL) return;
  float *out = get_output(kr->api, ctx, 0, x.dims, x.ndims);
  Tensor range_shape = x;
  size_t rows = 1;
  if (kr->layout == 1) { /* rows of the last axis */
    if (x.ndims >= 1) range_shape.dims[x.ndims - 1] = 1;
    rows = x.ndims >= 1 && x.dims[x.ndims - 1] > 0 ? x.count / (size_t)x.dims[x.ndims - 1] : 0;
  } else { /* one vector per sample: all axes but the first */
    for (size_t i = 1; i < x.ndims; i++) range_shape.dims[i] = 1;
    rows = x.ndims >= 1 ? (size_t)x.dims[0] : 1;
  }
  float *range = get_output(kr->api, ctx, 1, range_shape.dims, range_shape.ndims);
  if (out == NULL || range == NULL || rows == 0 || x.count == 0) return;
  DacArgs a = {x.data, out, range, x.count / rows, kr->levels, kr->tiny, (int)kr->codes};
  parallel(kr->api, ctx, dac_range, &a, rows, a.k, kr->threads);
}

/* ---- AdcOutput ---- */

typedef struct {
  const float *y, *range, *bias, *bank, *residual;
  float *out;
  size_t channels, inner; /* y is [rows, channels, inner] */
  size_t bank_len, start;
  float limit, w_max_step, scale;
  int layout, relu, gained;
} AdcArgs;

/* The elementwise ADC loop, with its five choices as literal constants so that each of the 32
   variants compiles to its own branch-free vector loop. */
#define ADC_LOOP(NOISE, SCALED, RES, BIAS_VEC, RELU)                          \
  for (size_t i = 0; i < len; i++) {                                         \
    float v = y[i];                                                          \
    if (SCALED) v = v * in_scale;                                            \
    if (NOISE) v = v + noise[i];                                             \
    v = v < neg ? neg : v;                                                   \
    v = v > lim ? lim : v;                                                   \
    float o = rintf(v) * u;                                                  \
    o = o + ((BIAS_VEC) ? bv[i] : bias_one);                                 \
    if (RES) o = o + res[i];                                                 \
    out[i] = (RELU) && o < 0.0f ? 0.0f : o; /* a NaN stays NaN, as in Relu */ \
  }

/* one contiguous run of n elements starting at flat index f, all of row r */
static void adc_run(const AdcArgs *a, size_t f, size_t n, size_t r, const float *bias_vec,
                    float bias_one) {
  const float unit = a->range[r] * a->w_max_step; /* the onnxruntime nodes' Mul, Reciprocal, Mul */
  const float lim = a->limit, neg = -a->limit, u = unit * a->scale, in_scale = 1.0f / unit;
  const int mask = (a->bank != NULL) | (!a->gained) << 1 | (a->residual != NULL) << 2 |
                   (bias_vec != NULL) << 3 | (a->relu != 0) << 4;
  size_t done = 0;
  while (done < n) {
    size_t len = n - done;
    const float *noise = NULL;
    if (a->bank) {
      size_t at = (a->start + f + done) % a->bank_len;
      if (len > a->bank_len - at) len = a->bank_len - at;
      noise = a->bank + at;
    }
    const float *y = a->y + f + done;
    float *out = a->out + f + done;
    const float *bv = bias_vec ? bias_vec + done : NULL;
    const float *res = a->residual ? a->residual + f + done : NULL;
    switch (mask) {
    case 0: ADC_LOOP(0, 0, 0, 0, 0); break;
    case 1: ADC_LOOP(1, 0, 0, 0, 0); break;
    case 2: ADC_LOOP(0, 1, 0, 0, 0); break;
    case 3: ADC_LOOP(1, 1, 0, 0, 0); break;
    case 4: ADC_LOOP(0, 0, 1, 0, 0); break;
    case 5: ADC_LOOP(1, 0, 1, 0, 0); break;
    case 6: ADC_LOOP(0, 1, 1, 0, 0); break;
    case 7: ADC_LOOP(1, 1, 1, 0, 0); break;
    case 8: ADC_LOOP(0, 0, 0, 1, 0); break;
    case 9: ADC_LOOP(1, 0, 0, 1, 0); break;
    case 10: ADC_LOOP(0, 1, 0, 1, 0); break;
    case 11: ADC_LOOP(1, 1, 0, 1, 0); break;
    case 12: ADC_LOOP(0, 0, 1, 1, 0); break;
    case 13: ADC_LOOP(1, 0, 1, 1, 0); break;
    case 14: ADC_LOOP(0, 1, 1, 1, 0); break;
    case 15: ADC_LOOP(1, 1, 1, 1, 0); break;
    case 16: ADC_LOOP(0, 0, 0, 0, 1); break;
    case 17: ADC_LOOP(1, 0, 0, 0, 1); break;
    case 18: ADC_LOOP(0, 1, 0, 0, 1); break;
    case 19: ADC_LOOP(1, 1, 0, 0, 1); break;
    case 20: ADC_LOOP(0, 0, 1, 0, 1); break;
    case 21: ADC_LOOP(1, 0, 1, 0, 1); break;
    case 22: ADC_LOOP(0, 1, 1, 0, 1); break;
    case 23: ADC_LOOP(1, 1, 1, 0, 1); break;
    case 24: ADC_LOOP(0, 0, 0, 1, 1); break;
    case 25: ADC_LOOP(1, 0, 0, 1, 1); break;
    case 26: ADC_LOOP(0, 1, 0, 1, 1); break;
    case 27: ADC_LOOP(1, 1, 0, 1, 1); break;
    case 28: ADC_LOOP(0, 0, 1, 1, 1); break;
    case 29: ADC_LOOP(1, 0, 1, 1, 1); break;
    case 30: ADC_LOOP(0, 1, 1, 1, 1); break;
    case 31: ADC_LOOP(1, 1, 1, 1, 1); break;
    }
    done += len;
  }
}

static void adc_range(const void *p, size_t lo, size_t hi) {
  const AdcArgs *a = (const AdcArgs *)p;
  if (a->layout == 1) { /* rows of `channels`, bias per element of a row */
    for (size_t r = lo; r < hi; r++) adc_run(a, r * a->channels, a->channels, r, a->bias, -0.0f);
    return;
  }
  for (size_t q = lo; q < hi; q++) { /* planes of `inner` elements: one (row, channel) each */
    size_t r = q / a->channels, c = q % a->channels;
    /* no bias: add -0.0, which leaves every value as it is (+0.0 would turn -0.0 into +0.0) */
    adc_run(a, q * a->inner, a->inner, r, NULL, a->bias ? a->bias[c] : -0.0f);
  }
}

static void adc_compute(void *kernel, void *ctx) {
  const Kernel *kr = (const Kernel *)kernel;
  Tensor y, range, w_max_step, scale, bias, bank, start, residual;
  if (!get_input(kr->api, ctx, 0, &y) || !get_input(kr->api, ctx, 1, &range) ||
      !get_input(kr->api, ctx, 2, &w_max_step) || !get_input(kr->api, ctx, 3, &scale) ||
      !get_input(kr->api, ctx, 4, &bias) || !get_input(kr->api, ctx, 5, &bank) ||
      !get_input(kr->api, ctx, 6, &start) || !get_input(kr->api, ctx, 7, &residual))
    return;
  float *out = get_output(kr->api, ctx, 0, y.dims, y.ndims);
  if (out == NULL || y.value == NULL || range.value == NULL) return;
  size_t rows = range.count, channels = 1;
  if (kr->layout == 1 && y.ndims >= 1)
    channels = (size_t)y.dims[y.ndims - 1];
  else if (kr->layout == 0 && y.ndims >= 2)
    channels = (size_t)y.dims[1];
  int bad = rows == 0 || channels == 0 || y.count % (rows * channels) != 0 ||
            (kr->layout == 1 && y.count / rows != channels) ||
            (bias.value && bias.count != channels) ||
            w_max_step.count != 1 || scale.count != 1 || (bank.value && bank.count == 0) ||
            (residual.value && residual.count != y.count) ||
            (bank.value && (start.value == NULL || start.count != 1));
  if (bad) {
    for (size_t i = 0; i < y.count; i++) out[i] = NAN; /* shapes the rewrite never writes */
    return;
  }
  AdcArgs a = {y.data,
               range.data,
               bias.value ? bias.data : NULL,
               bank.value ? bank.data : NULL,
               residual.value ? residual.data : NULL,
               out,
               channels,
               y.count / (rows * channels),
               bank.count,
               bank.value ? (size_t)(*(const int64_t *)start.data) : 0,
               kr->limit,
               *(const float *)w_max_step.data,
               *(const float *)scale.data,
               (int)kr->layout,
               (int)kr->relu,
               (int)kr->gained};
  if (a.layout == 1)
    parallel(kr->api, ctx, adc_range, &a, rows, channels, kr->threads);
  else
    parallel(kr->api, ctx, adc_range, &a, rows * channels, a.inner, kr->threads);
}

/* ---- op definitions ---- */

static void *create_kernel(const CustomOp *op, const Fn *api, const void *info) {
  (void)op;
  Kernel *k = (Kernel *)calloc(1, sizeof(Kernel));
  if (k == NULL) return NULL;
  k->api = api;
  k->limit = INFINITY;
  k->levels = 1.0f;
  k->codes = 1;
  k->gained = 1;
  float v_float;
  int64_t v;
  OrtStatus *s;
  float *floats[] = {&k->limit, &k->levels, &k->tiny};
  const char *float_names[] = {"limit", "levels", "tiny"};
  for (int i = 0; i < 3; i++) {
    if (!(s = CALL(api, KernelInfoGetAttribute_float, AttrFloatFn, info, float_names[i], &v_float)))
      *floats[i] = v_float;
    else
      CALL(api, ReleaseStatus, ReleaseFn, s);
  }
  int64_t *fields[] = {&k->layout, &k->relu, &k->threads, &k->codes, &k->gained};
  const char *names[] = {"layout", "relu", "threads", "codes", "gained"};
  for (int i = 0; i < 5; i++) {
    if (!(s = CALL(api, KernelInfoGetAttribute_int64, AttrInt64Fn, info, names[i], &v)))
      *fields[i] = v;
    else
      CALL(api, ReleaseStatus, ReleaseFn, s);
  }
  return k;
}

static void destroy_kernel(void *k) { free(k); }
static const char *cpu_provider(const CustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static const char *dac_name(const CustomOp *op) { (void)op; return "DacCodes"; }
static const char *adc_name(const CustomOp *op) { (void)op; return "AdcOutput"; }
static int dac_input_type(const CustomOp *op, size_t i) { (void)op; (void)i; return TYPE_FLOAT; }
static size_t dac_inputs(const CustomOp *op) { (void)op; return 1; }
static int adc_input_type(const CustomOp *op, size_t i) {
  (void)op;
  return i == 6 ? TYPE_INT64 : TYPE_FLOAT;
}
static size_t adc_inputs(const CustomOp *op) { (void)op; return 8; }
static int output_type(const CustomOp *op, size_t i) { (void)op; (void)i; return TYPE_FLOAT; }
static size_t one_output(const CustomOp *op) { (void)op; return 1; }
static size_t two_outputs(const CustomOp *op) { (void)op; return 2; }
static int dac_input_kind(const CustomOp *op, size_t i) { (void)op; (void)i; return REQUIRED; }
static int adc_input_kind(const CustomOp *op, size_t i) { (void)op; return i < 4 ? REQUIRED : OPTIONAL; }
static int required(const CustomOp *op, size_t i) { (void)op; (void)i; return REQUIRED; }
static int default_memory(const CustomOp *op, size_t i) { (void)op; (void)i; return 0; }

static const CustomOp DAC_OP = {LE_OP_VERSION, create_kernel, dac_name, cpu_provider,
                                dac_input_type, dac_inputs, output_type, two_outputs,
                                dac_compute, destroy_kernel, dac_input_kind, required,
                                default_memory};
static const CustomOp ADC_OP = {LE_OP_VERSION, create_kernel, adc_name, cpu_provider,
                                adc_input_type, adc_inputs, output_type, one_output,
                                adc_compute, destroy_kernel, adc_input_kind, required,
                                default_memory};

typedef OrtStatus *(*CreateDomainFn)(const char *, void **);
typedef OrtStatus *(*DomainAddFn)(void *, const CustomOp *);
typedef OrtStatus *(*AddDomainFn)(void *, void *);

/* The entry point onnxruntime calls (SessionOptions.register_custom_ops_library). The domain
   lives as long as the process: sessions may outlive any one set of options. */
OrtStatus *RegisterCustomOps(void *options, const ApiBase *base) {
  const Fn *api = base->GetApi(LE_API_VERSION);
  if (api == NULL) { /* onnxruntime < 1.17: say so through the oldest table */
    const Fn *old = base->GetApi(1);
    return old ? CALL(old, CreateStatus, CreateStatusFn, 1, "latentedge io_kernels need onnxruntime >= 1.17")
               : NULL;
  }
  void *domain = NULL;
  OrtStatus *s = CALL(api, CreateCustomOpDomain, CreateDomainFn, "ai.latentedge.device_sim", &domain);
  if (s) return s;
  if ((s = CALL(api, CustomOpDomain_Add, DomainAddFn, domain, &DAC_OP))) return s;
  if ((s = CALL(api, CustomOpDomain_Add, DomainAddFn, domain, &ADC_OP))) return s;
  return CALL(api, AddCustomOpDomain, AddDomainFn, options, domain);
}
